"""Any Linux, any architecture: the runner binary alone in an empty image, and a third
architecture (riscv64, emulated) end to end."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import docker
import pytest

from cronium_nb import Event, Executor, Fleet, Status
from cronium_nb.resources import runner_dist
from tests.runner_harness import leftover_processes, wait_for

pytestmark = pytest.mark.fleet
MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "riscv64": "riscv64"}


@pytest.mark.parametrize("arch", list(MACHINES))
def test_the_runner_starts_in_an_image_holding_nothing_but_itself(arch: str) -> None:
    """No libc, no shell, no /etc: a static binary needs nothing of the server."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = (runner_dist() / f"cronium-runner-linux-{arch}").read_bytes()
        member = tarfile.TarInfo("cronium-runner")
        member.size, member.mode = len(data), 0o755
        tar.addfile(member, io.BytesIO(data))
    client = docker.from_env()
    repository = f"cronium-runner-only-{uuid.uuid4().hex[:8]}"
    client.api.import_image_from_data(archive.getvalue(), repository=repository, tag=arch)
    try:
        output = client.containers.run(f"{repository}:{arch}", ["/cronium-runner", "version", "--json"], remove=True)
    finally:
        client.images.remove(f"{repository}:{arch}", force=True)
    info = json.loads(output)
    assert (info["flavour"], info["arch"]) == ("static", MACHINES[arch])


@pytest.fixture(scope="module")
def riscv_fleet(cronium_fleet_factory) -> Fleet:
    return cronium_fleet_factory(amd64=0, arm64=0, riscv64=1, variant="bare", name_prefix="rv-")


def test_the_quickstart_event_on_riscv64(riscv_fleet: Fleet, tmp_path: Path) -> None:
    script = (
        'echo "hello from $(cronium.event server) $(uname -m)"\n'
        'cronium.output machine "$(uname -m)"\n'
        "cronium.output square $(( $(cronium.input n) * $(cronium.input n) ))\n"
    )
    with Executor(riscv_fleet.inventory, state_dir=tmp_path / "state") as executor:
        first = executor.run(Event(name="quickstart", script=script, timeout=300), input={"n": 7})
        again = executor.run(Event(name="quickstart", script=script, timeout=300), input={"n": 7})
    assert first.ok, first.summary.to_string()
    assert first.outputs == {"rv-riscv64-1": {"machine": "riscv64", "square": 49}}
    assert first.logs["line"].tolist() == ["hello from rv-riscv64-1 riscv64"]
    assert first.summary[["arch", "deploy"]].values.tolist() == [["riscv64", "deployed"]]
    assert again.ok and again.summary["deploy"].tolist() == ["cached"]


def test_a_timeout_on_riscv64_leaves_nothing_running(riscv_fleet: Fleet, tmp_path: Path) -> None:
    event = Event(name="too-slow", script="echo start\nsetsid sleep 4011 &\nsleep 4012\n", timeout=5, grace_period=2)
    with Executor(riscv_fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(event)
    assert result.status == Status.TIMEOUT, result.summary.to_string()
    assert result.logs["line"].tolist() == ["start"]
    assert wait_for(lambda: not leftover_processes(riscv_fleet, "rv-riscv64-1", r"sleep 401[12]"), timeout=60), (
        leftover_processes(riscv_fleet, "rv-riscv64-1", r"sleep 401[12]")
    )
