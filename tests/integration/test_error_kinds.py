"""Every kind of server failure, provoked for real on the fleet: each ends as that server's row
with its ``error_kind`` (in the result, the summary and the store), while the other server of
the execution runs normally. Together they cover every kind in ``cronium_nb.errors.ERROR_KINDS``
(``worker_lost``, a Dask worker killed mid-run: test_dask.py)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import asyncssh
import pytest

from cronium_nb import Event, Executor, Fleet, Status
from cronium_nb.fleet import FIXTURE_SUDO_PASSWORD
from cronium_nb.model import Server
from cronium_nb.server_run import ServerRun
from cronium_nb.store import Store
from tests.runner_harness import submit_and_wait_for_output

pytestmark = pytest.mark.fleet


def check(result, server: str, kind: str, state_dir: Path, status: Status = Status.FAILED) -> None:
    """``server`` failed with ``kind`` everywhere it is shown or kept."""
    row = result.summary.set_index("server").loc[server]
    assert (result[server].status, result[server].error_kind) == (status, kind), result.summary.to_string()
    assert row["error_kind"] == kind and row["error"], row
    with Store(state_dir) as store:
        stored = store.server_results(result.execution_id).set_index("server").loc[server]
    assert stored["error_kind"] == kind


def with_server(fleet: Fleet, name: str, **changes) -> list[Server]:
    """The fleet's servers, ``name`` changed (the other one stays as it is, and must succeed)."""
    return [dataclasses.replace(s, **changes) if s.name == name else s for s in fleet.inventory.servers.values()]


def other(fleet: Fleet, name: str) -> str:
    return next(n for n in fleet.names if n != name)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens on it once it is closed


def test_unreachable_auth_and_host_key(cronium_fleet: Fleet, tmp_path: Path) -> None:
    first = cronium_fleet.names[0]
    wrong_key = tmp_path / "wrong_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(wrong_key))
    wrong_known_hosts = tmp_path / "known_hosts"
    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    wrong_known_hosts.write_text(f"[127.0.0.1]:{cronium_fleet.inventory[first].port} {stranger}")
    cases = {
        "unreachable": {"port": closed_port()},
        "auth": {"key_path": str(wrong_key)},
        "host_key": {"known_hosts": str(wrong_known_hosts)},
    }
    event = Event(name="kinds-connect", script="echo fine")
    for kind, changes in cases.items():
        state = tmp_path / kind
        with Executor(cronium_fleet.inventory, state_dir=state) as executor:
            result = executor.run(event, servers=with_server(cronium_fleet, first, **changes))
        check(result, first, kind, state)
        assert result[other(cronium_fleet, first)].status == Status.SUCCESS


def test_deploy_when_no_build_fits(cronium_fleet: Fleet, tmp_path: Path) -> None:
    """A runner dist without the arm64 build: the arm64 server fails to deploy, amd64 runs."""
    from cronium_nb.resources import runner_dist

    dist = tmp_path / "dist"
    dist.mkdir()
    source = runner_dist()
    for name in ("cronium-runner-linux-amd64", "cronium-runner-linux-amd64.sha256", "runner.json"):
        (dist / name).write_bytes((source / name).read_bytes())
    arm64 = next(n for n in cronium_fleet.names if cronium_fleet.member(n).arch == "arm64")
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state", runner_dist=dist) as executor:
        result = executor.run(Event(name="kinds-deploy", script="echo fine"), servers="all")
    check(result, arm64, "deploy", tmp_path / "state")
    assert result[other(cronium_fleet, arm64)].status == Status.SUCCESS


def test_runner_error_script_timeout_and_internal(
    cronium_fleet: Fleet, cronium_bare_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cronium_fleet.names[0]
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state") as executor:
        failing = Event(name="kinds-script", script=f'[ "$CRONIUM_SERVER" = {first} ] && exit 3; echo fine')
        check(executor.run(failing, servers="all"), first, "script", tmp_path / "state")
        slow = Event(name="kinds-timeout", script=f'[ "$CRONIUM_SERVER" = {first} ] && sleep 60; echo fine')
        check(executor.run(slow, servers="all", timeout=2), first, "timeout", tmp_path / "state", Status.TIMEOUT)

        original = ServerRun._run_payload

        async def buggy(self, *args, **kwargs):  # stands in for a bug on the way to one server's run
            if self.server.name == first:
                raise RuntimeError("boom")
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(ServerRun, "_run_payload", buggy)
        result = executor.run(Event(name="kinds-internal", script="echo fine"))
        monkeypatch.undo()
        check(result, first, "internal", tmp_path / "state")
        assert "boom" in result[first].error
    bare = cronium_bare_fleet.names[0]
    with Executor(cronium_bare_fleet.inventory, state_dir=tmp_path / "bare") as executor:
        python = Event(name="kinds-runner", type="python", script="print('no python3 here')")
        check(executor.run(python, servers=[bare]), bare, "runner", tmp_path / "bare")


def test_cancelled(cronium_fleet: Fleet, tmp_path: Path) -> None:
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state") as executor:
        job = submit_and_wait_for_output(executor, Event(name="kinds-cancel", script="echo running; sleep 600"))
        job.cancel()
        result = job.result(timeout=120)
    for name in cronium_fleet.names:
        check(result, name, "cancelled", tmp_path / "state", Status.CANCELLED)


def test_become(cronium_fleet: Fleet, tmp_path: Path) -> None:
    """sudo refuses one server's login user (intruder may not sudo); the other logs in as root,
    which needs no sudo to become root."""
    first = cronium_fleet.names[0]
    servers = with_server(cronium_fleet, first, user="intruder")
    with Executor(state_dir=tmp_path / "state", become_password=FIXTURE_SUDO_PASSWORD) as executor:
        result = executor.run(Event(name="kinds-become", script="id -u", become=True), servers=servers)
    check(result, first, "become", tmp_path / "state")
    assert "intruder is not in the sudoers file" in result[first].error
    assert result[other(cronium_fleet, first)].status == Status.SUCCESS
