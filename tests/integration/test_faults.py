"""Faults on both architectures: each asserts the outcome, that nothing of the job is left
running on the server, and that the store recorded the execution."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cronium_nb import Callbacks, Event, Executor, SSHOptions, Status
from cronium_nb.store import Store
from tests.runner_harness import leftover_processes, submit_and_wait_for_output, wait_for

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]


@pytest.fixture(params=ARCHES)
def single(request, cronium_fleet_factory):
    """A one-server fleet of one architecture, only for this module's faults."""
    arch = request.param
    fleet = cronium_fleet_factory(amd64=int(arch == "amd64"), arm64=int(arch == "arm64"), name_prefix="fault-")
    return fleet, fleet.names[0]


def recorded(executor: Executor, status: str) -> None:
    history = executor.history()
    assert history.iloc[0]["status"] == status, history


def test_restart_between_runs_revalidates_the_cache(single, tmp_path: Path) -> None:
    fleet, name = single
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        event = Event(name="before-restart", script="echo up")
        assert executor.run(event).ok
        fleet.restart(name)
        again = executor.run(event)
    assert again.ok, again.summary.to_string()
    assert again[name].deploy == "verified"  # a new connection checked the runner on the server


def test_paused_mid_deploy_fails_and_leaves_nothing(single, tmp_path: Path) -> None:
    fleet, name = single
    fleet.exec(name, "rm -rf ~/.cache/cronium")
    options = SSHOptions(keepalive_interval=1, keepalive_count_max=3)
    paused = threading.Event()

    def on_status(result) -> None:
        if result.phase == "deploy" and not paused.is_set():
            paused.set()
            fleet.pause(name)

    with Executor(fleet.inventory, state_dir=tmp_path / "state", ssh_options=options) as executor:
        try:
            result = executor.submit(
                Event(name="mid-deploy", script="echo never"), callbacks=Callbacks(on_status=on_status)
            ).result(timeout=120)
        finally:
            fleet.unpause(name)
        assert result[name].status == Status.FAILED
        assert "connection" in result[name].error.lower() or "deploy" in result[name].error.lower()
        recorded(executor, "failed")
        assert wait_for(lambda: not leftover_processes(fleet, name, r"tar xzf|sha256sum"))
        assert executor.run(Event(name="after-pause", script="echo fine")).ok


def test_runner_removed_mid_run(single, tmp_path: Path) -> None:
    fleet, name = single
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        job = submit_and_wait_for_output(executor, Event(name="runner-gone", script="echo running; sleep 2; echo done"))
        assert fleet.exec(name, "rm -rf ~/.cache/cronium/runner").exit_code == 0
        result = job.result(timeout=120)
        assert result.ok, result.summary.to_string()  # the running runner is not disturbed
        assert list(result.logs["line"]) == ["running", "done"]
        nxt = executor.run(Event(name="runner-gone", script="echo again"))
        assert nxt.ok and nxt[name].deploy == "deployed"


def test_killing_sshd_mid_run(single, tmp_path: Path) -> None:
    fleet, name = single
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        job = submit_and_wait_for_output(executor, Event(name="sshd-dies", script="echo running; sleep 6001"))
        fleet.kill_sshd(name)
        try:
            result = job.result(timeout=120)
            assert result[name].status == Status.FAILED and "connection" in result[name].error.lower()
            recorded(executor, "failed")
            assert wait_for(lambda: not leftover_processes(fleet, name, r"sleep 6001"), timeout=60)
        finally:
            fleet.restart(name)
        assert executor.run(Event(name="after-sshd", script="echo back")).ok


@pytest.mark.parametrize("arch", ARCHES)
def test_disk_full_during_deploy(cronium_fleet_factory, tmp_path: Path, arch: str) -> None:
    fleet = cronium_fleet_factory(
        amd64=int(arch == "amd64"), arm64=int(arch == "arm64"), tmpfs={"/root/.cache": "size=1m"}, name_prefix="full-"
    )
    name = fleet.names[0]
    with Executor(fleet.inventory, state_dir=tmp_path / "state", deploy_backoff=(0.1, 0.1)) as executor:
        result = executor.run(Event(name="no-space", script="true"))
        assert result[name].status == Status.FAILED
        assert "failed 3 times" in result[name].error and "No space left" in result[name].error
        recorded(executor, "failed")
    leftovers = fleet.exec(name, "ls -A ~/.cache/cronium/runner").output.split()
    assert not [entry for entry in leftovers if entry.startswith(".partial-")], leftovers


ORCHESTRATOR = """
import sys
from cronium_nb import Callbacks, Event, Executor, Inventory
executor = Executor(Inventory.load(sys.argv[1]), state_dir=sys.argv[2])
announce = Callbacks(on_line=lambda *line: print("running", flush=True))
executor.submit(Event(name="orphaned", script="echo running; sleep 6002"), callbacks=announce).wait()
"""


def test_orchestrator_killed_mid_run(single, tmp_path: Path) -> None:
    fleet, name = single
    server = fleet.servers[0]
    inventory = tmp_path / "servers.yaml"
    inventory.write_text(yaml.safe_dump({"servers": [{
        "name": server.name, "host": server.host, "port": server.port,
        "key_path": server.key_path, "known_hosts": server.known_hosts,
    }]}))  # fmt: skip
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, str(inventory), str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "running"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert wait_for(lambda: not leftover_processes(fleet, name, r"sleep 6002"), timeout=60)
    with Store(state) as store:
        assert store.history().iloc[0]["status"] == "interrupted"
    with Executor(fleet.inventory, state_dir=state) as executor:
        assert executor.history().iloc[0]["status"] == "interrupted"
        assert executor.run(Event(name="after-crash", script="echo fine")).ok
