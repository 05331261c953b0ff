"""Fixtures of the unit tests: the in-process SSH servers (see inprocess_sshd.py)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.runner_harness import HOST_ARCH
from tests.unit.inprocess_sshd import LocalFleet, SSHHub

RUNNER_DIST = REPO_ROOT / "runner" / "dist"
FAST_BACKOFF = (0.1, 0.1, 0.1)
FAST_CONNECT_BACKOFF = (0.05,)


def _host_build_missing() -> str | None:
    info = RUNNER_DIST / "runner.json"
    if not info.is_file():
        return f"no runner builds in {RUNNER_DIST}: run `make runner`"
    binary = RUNNER_DIST / f"cronium-runner-linux-{HOST_ARCH}"
    if HOST_ARCH not in json.loads(info.read_text())["binaries"] or not binary.is_file():
        return f"no runner build for this machine ({os.uname().machine}) in {RUNNER_DIST}: run `make runner`"
    return None


@pytest.fixture(scope="session")
def ssh_hub() -> Iterator[SSHHub]:
    """The loop thread hosting every in-process SSH server of the session."""
    hub = SSHHub()
    yield hub
    hub.close()


@pytest.fixture
def local_servers(ssh_hub: SSHHub, tmp_path: Path) -> Iterator[Callable[..., LocalFleet]]:
    """``local_servers(n)``: n new in-process SSH servers (``srv-1`` ...), each with its own home;
    ``.inventory`` lists them, ``fleet["srv-1"]`` is the server itself. Stopped after the test,
    with every process they started."""
    missing = _host_build_missing()
    if missing:
        pytest.skip(missing)
    fleets: list[LocalFleet] = []
    counter = itertools.count()

    def make(count: int = 2, prefix: str = "srv") -> LocalFleet:
        names = [f"{prefix}-{i}" for i in range(1, count + 1)]
        fleet = LocalFleet(ssh_hub, names, tmp_path / f"known_hosts{next(counter)}")
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture
def local_executor(local_servers, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``local_executor(inventory, **options)``: an Executor with its own state dir (or
    ``state_dir=``), the checkout's runner builds, short deploy and connect back-offs and no
    ssh config file (unless ``ssh_options=`` says otherwise); all are closed before the servers
    stop."""
    from cronium_nb import Executor, SSHOptions

    made: list[Executor] = []

    def make(inventory, **options) -> Executor:
        options.setdefault("state_dir", tmp_path / f"state{len(made)}")
        options.setdefault("deploy_backoff", FAST_BACKOFF)
        options.setdefault("runner_dist", RUNNER_DIST)
        options.setdefault("ssh_options", SSHOptions(ssh_config=None, connect_backoff=FAST_CONNECT_BACKOFF))
        executor = Executor(inventory, **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()
