"""The runner daemon: one per user and server, reached through a Unix socket, so that a new SSH
connection starts no runner process; and the fall-backs where it cannot be used."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from cronium_nb import Event, Executor, SSHOptions
from tests.runner_harness import leftover_processes, processes_matching, runner_daemons, wait_for

# The script reports the process that runs it (its session) and that process's parent.
WHO_RUNS_ME = 'echo "session $PPID $(ps -o args= -p $PPID)"; echo "parent $(ps -o ppid= -p $PPID | tr -d " ")"'
DAEMON = r"cronium-runner daemon"


def who_runs(executor: Executor, server: str) -> dict[str, str]:
    result = executor.run(Event(name="who-runs-me", script=WHO_RUNS_ME), servers=[server])
    assert result.ok, result.summary.to_string()
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.logs["line"]}


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_new_connections_are_served_by_one_daemon(cronium_fleet_factory, tmp_path: Path, arch: str) -> None:
    fleet = cronium_fleet_factory(amd64=int(arch == "amd64"), arm64=int(arch == "arm64"), name_prefix="daemon-")
    name = fleet.names[0]
    sessions, daemons = [], []
    for _connection in range(2):  # two executors: two connections
        with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
            seen = who_runs(executor, name)
            sessions.append(seen["session"])
            daemons.append(runner_daemons(fleet, name))
            assert daemons[-1] == [seen["parent"]], (seen, processes_matching(fleet, name, DAEMON))
            assert " daemon --socket " in seen["session"]
        # The connection is gone: its session went with it; the daemon stays, alone.
        assert wait_for(lambda: not leftover_processes(fleet, name, "who-runs-me"), timeout=30)
    assert daemons[0] == daemons[1] and sessions[0] != sessions[1]


def test_the_daemon_leaves_when_idle(cronium_fleet_factory, tmp_path: Path) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="daemonidle-")
    name = fleet.names[0]
    with Executor(fleet.inventory, state_dir=tmp_path, ssh_options=SSHOptions(runner_daemon_idle_timeout=1)) as ex:
        who_runs(ex, name)
        assert runner_daemons(fleet, name)
    # Idle for a second, it notices within its 5 s check interval: a bounded wait, not a sleep.
    assert wait_for(lambda: not runner_daemons(fleet, name), timeout=30)
    assert fleet.exec(name, "ls ~/.cache/cronium/runner/*/daemon-*.sock 2>/dev/null | wc -l").output.strip() == "0"


def test_without_stream_local_channels_each_connection_starts_its_runner(cronium_fleet_factory, tmp_path) -> None:
    fleet = cronium_fleet_factory(
        amd64=1, arm64=0, sshd_options={"AllowStreamLocalForwarding": "no"}, name_prefix="nosocket-"
    )
    name = fleet.names[0]
    with Executor(fleet.inventory, state_dir=tmp_path) as executor:
        seen = who_runs(executor, name)
        assert " serve" in seen["session"] and "daemon" not in seen["session"]
        assert who_runs(executor, name)["session"] == seen["session"]  # the same session, kept


def test_no_daemon_when_switched_off(cronium_fleet_factory, tmp_path: Path) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="nodaemon-")
    name = fleet.names[0]
    with Executor(fleet.inventory, state_dir=tmp_path, ssh_options=SSHOptions(runner_daemon_idle_timeout=0)) as ex:
        seen = who_runs(ex, name)
        assert " serve" in seen["session"]
        assert runner_daemons(fleet, name) == []


def test_round_trips_of_a_new_connection(cronium_fleet_factory, tmp_path: Path, monkeypatch) -> None:
    """The commands a new connection runs: with the daemon up, only a shell builtin (which wakes
    the connection for the daemon's channel); with the runner gone from a server probed before,
    that, the probe and the install, which starts the daemon too (no verify, no daemon start)."""
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="daemon-")
    name = fleet.names[0]
    commands: list[str] = []
    original = asyncssh.SSHClientConnection.create_process

    async def counted(self, command=None, *args, **kwargs):
        commands.append(str(command))
        return await original(self, command, *args, **kwargs)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "create_process", counted)
    event = Event(name="round-trips", script="echo hi")
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        assert executor.run(event).ok  # deployed; the host's facts remembered
    commands.clear()
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(event)
    assert result.ok and result[name].deploy == "verified", result.summary.to_string()
    assert commands == [":"], commands
    fleet.exec(name, "pkill -f 'cronium-runner [d]aemon'; rm -rf ~/.cache/cronium")
    commands.clear()
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(event)
    assert result.ok and result[name].deploy == "deployed", result.summary.to_string()
    assert len(commands) == 3 and commands[0] == ":" and "machine $(uname -m)" in commands[1], commands
    assert "gzip -dc" in commands[2] and " daemon --socket " in commands[2], commands
    assert len(runner_daemons(fleet, name)) == 1
