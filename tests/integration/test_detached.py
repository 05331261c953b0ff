"""Detached runs on both architectures: a run that outlives the process that submitted it
(SIGKILLed), followed again by a new process's attach (every line, in order, once), its
timeout enforced on the server while no one follows, listing, cancelling, the bounded spool,
and the job dir left on the server: private while it runs, gone once fetched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cronium_nb import Callbacks, DetachedError, Event, Executor, Status
from cronium_nb.detached import job_name
from cronium_nb.store import Store
from tests.runner_harness import processes_matching, wait_for

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
JOBS = "~/.cache/cronium/runs/jobs"


@pytest.fixture(params=ARCHES)
def single(request, cronium_fleet):
    """One server of the session's fleet, of each architecture."""
    name = next(n for n in cronium_fleet.names if n.startswith(request.param))
    return cronium_fleet, name


# The orchestrator in a process of its own: submits the event detached to one server, prints
# the execution id, then "running" at the script's first line, and waits (to be SIGKILLed).
ORCHESTRATOR = """
import json, sys
from cronium_nb import Callbacks, Event, Executor, Inventory
executor = Executor(Inventory.load(sys.argv[1]), state_dir=sys.argv[2])
event = Event(**json.loads(sys.argv[3]))
first = []
def on_line(*line):
    if not first:
        first.append(line)
        print("running", flush=True)
job = executor.submit(event, callbacks=Callbacks(on_line=on_line), detach=True)
print(job.execution_id, flush=True)
print("ended before it was killed:", job.result().summary.to_dict("records"), flush=True)
"""


def submit_in_child_and_kill(fleet, name: str, tmp_path: Path, event: dict) -> tuple[str, Path]:
    """Submit ``event`` detached from a child process, SIGKILL it once the script has printed
    its first line; the execution id and the state dir."""
    server = fleet.inventory.servers[name]
    inventory = tmp_path / "servers.yaml"
    inventory.write_text(yaml.safe_dump({"servers": [{
        "name": server.name, "host": server.host, "port": server.port,
        "key_path": server.key_path, "known_hosts": server.known_hosts,
    }]}))  # fmt: skip
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, str(inventory), str(state), json.dumps(event)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        execution_id = child.stdout.readline().strip()
        first = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert first == "running", first + child.stdout.read()
    return execution_id, state


def job_dir(execution_id: str, name: str) -> str:
    return f"{JOBS}/{job_name(execution_id, name)}"


def test_detached_run_survives_a_killed_orchestrator_and_attach_gets_every_line(single, tmp_path: Path) -> None:
    fleet, name = single
    script = (
        'echo "token $API_TOKEN"; for i in $(seq 1 300); do echo "line $i"; done; sleep 12; '
        'for i in $(seq 301 600); do echo "line $i"; done; cronium.output done 600'
    )
    secrets = {"API_TOKEN": "s3cr3t-value-42"}
    execution_id, state = submit_in_child_and_kill(
        fleet, name, tmp_path, {"name": "survivor", "script": script, "timeout": 300, "secrets": secrets}
    )
    # The orchestrator is gone; the run is not.
    assert processes_matching(fleet, name, r"sleep 12"), "the detached run died with its orchestrator"
    listing = fleet.exec(name, f"stat -c '%a %U' {job_dir(execution_id, name)} {job_dir(execution_id, name)}/*")
    assert listing.exit_code == 0 and set(listing.output.split("\n")[:-1]) == {"700 root", "600 root"}, listing.output
    spool = f"{job_dir(execution_id, name)}/spool"  # redacted on the server, before it is spooled
    assert fleet.exec(name, f"grep -c 'token \\*\\*\\*' {spool}").output.strip() == "1"
    assert fleet.exec(name, f"grep -r s3cr3t {job_dir(execution_id, name)}").exit_code == 1
    with Store(state) as store:  # opened after the owner died: detached, not interrupted
        assert store.execution_status(execution_id) == Status.DETACHED

    lines: list[str] = []
    with Executor(fleet.inventory, state_dir=state) as executor:
        listed = executor.detached()
        row = listed[listed["execution_id"] == execution_id].iloc[0]
        assert row["server"] == name and row["state"] == "running", listed.to_string()
        assert row["pid"] > 0 and row["started_at"].year >= 2025
        shown = Callbacks(on_line=lambda server, stream, line, ts: lines.append(line))
        result = executor.attach(execution_id, callbacks=shown)
        assert result.status == Status.SUCCESS, result.summary.to_string()
        assert result[name].outputs == {"done": 600} and result[name].exit_code == 0
        expected = ["token ***"] + [f"line {i}" for i in range(1, 601)]  # attached without the secrets
        assert list(result.logs["line"]) == expected  # stored: every line once, in order
        assert list(result.logs["seq"]) == list(range(1, 602))
        assert lines == expected  # shown live: the missed lines first, then the rest
        history = executor.history()
        assert history[history["execution_id"] == execution_id].iloc[0]["status"] == "success"
        assert executor.detached().empty  # nothing left to follow
    # fetched: the job dir is gone from the server
    assert fleet.exec(name, f"test -e {job_dir(execution_id, name)}").exit_code != 0


def test_timeout_applies_while_detached(single, tmp_path: Path) -> None:
    fleet, name = single
    execution_id, state = submit_in_child_and_kill(
        fleet, name, tmp_path, {"name": "detached-timeout", "script": "echo begin; sleep 6003", "timeout": 20}
    )
    assert processes_matching(fleet, name, r"sleep 6003")  # its orchestrator is gone, the run is not
    # Nobody follows it: the keeper on the server stops it at its timeout.
    assert wait_for(lambda: not processes_matching(fleet, name, r"sleep 6003|cronium-runner keeper"), timeout=120)
    with Executor(fleet.inventory, state_dir=state) as executor:
        listed = executor.detached()
        assert list(listed["state"]) == ["finished"], listed.to_string()
        assert listed.iloc[0]["stop_reason"] == "timeout"
        result = executor.attach(execution_id)
        assert result.status == Status.TIMEOUT and result[name].error_kind == "timeout", result.summary.to_string()
        assert list(result.logs["line"]) == ["begin"]
    assert fleet.exec(name, f"test -e {job_dir(execution_id, name)}").exit_code != 0


def test_close_leaves_it_running_and_cancel_detached_stops_it(single, tmp_path: Path) -> None:
    fleet, name = single
    state = tmp_path / "state"
    event = Event(name="left-running", script="echo up; sleep 6004", timeout=600)
    started = threading.Event()
    with Executor(fleet.inventory, state_dir=state) as executor:
        job = executor.submit(event, name, callbacks=Callbacks(on_line=lambda *line: started.set()), detach=True)
        job_id = job.execution_id
        assert started.wait(120)
    left = job.result(timeout=60)  # close() stopped following; the run goes on
    assert left.status == Status.DETACHED and left[name].status == Status.DETACHED, left.summary.to_string()
    assert processes_matching(fleet, name, r"sleep 6004")
    with Executor(fleet.inventory, state_dir=state) as executor:
        assert executor.history().iloc[0]["status"] == "detached"
        result = executor.cancel_detached(job_id)
        assert result.status == Status.CANCELLED and result[name].error_kind == "cancelled", result.summary.to_string()
        assert list(result.logs["line"]) == ["up"]
        assert wait_for(lambda: not processes_matching(fleet, name, r"sleep 6004"), timeout=60)
        assert executor.history().iloc[0]["status"] == "cancelled"
    assert fleet.exec(name, f"test -e {job_dir(job_id, name)}").exit_code != 0


def test_job_cancel_of_a_followed_detached_run_stops_it(single, tmp_path: Path) -> None:
    fleet, name = single
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        started = threading.Event()
        job = executor.submit(
            Event(name="cancel-detached", script="echo up; sleep 6005", timeout=600),
            name,
            callbacks=Callbacks(on_line=lambda *line: started.set()),
            detach=True,
        )
        assert started.wait(120)
        with pytest.raises(DetachedError, match=r"follows execution .* already"):
            executor.attach(job.execution_id)
        job.cancel()
        result = job.result(timeout=120)
        assert result.status == Status.CANCELLED, result.summary.to_string()
        assert wait_for(lambda: not processes_matching(fleet, name, r"sleep 6005"), timeout=60)


def test_spool_is_bounded_with_a_marker(single, tmp_path: Path) -> None:
    fleet, name = single
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        executor.detached_spool_bytes = 4096
        event = Event(name="chatty-detached", script='for i in $(seq 1 3000); do echo "line $i"; done')
        result = executor.submit(event, name, detach=True).result(timeout=180)
        assert result.ok, result.summary.to_string()
        logs = result.logs
        kept = logs[logs["stream"] == "stdout"]["line"].tolist()
        assert kept[:3] == ["line 1", "line 2", "line 3"] and len("\n".join(kept)) <= 4096
        marker = logs.iloc[-1]
        assert marker["stream"] == "cronium" and "output dropped on the server" in marker["line"], marker
        assert "spool limit of 4 KiB" in marker["line"]


def test_a_detached_cell_outlives_its_kernel_and_a_new_kernel_attaches(cronium_fleet, tmp_path: Path) -> None:
    """The notebook way, on every server of the fleet (amd64 and arm64): a ``%%cronium --detach``
    cell, its kernel killed mid-run, and ``%cronium_attach`` in a new kernel."""
    from tests.integration.test_notebooks import Kernel, text_of

    inventory = tmp_path / "servers.yaml"
    inventory.write_text(yaml.safe_dump({"servers": [
        {"name": s.name, "host": s.host, "port": s.port, "key_path": s.key_path, "known_hosts": s.known_hosts}
        for s in cronium_fleet.servers
    ]}))  # fmt: skip
    env = {"CRONIUM_DISPLAY": "text", "CRONIUM_HOME": str(tmp_path / "home")}
    setup = f"%load_ext cronium_nb\n%cronium_servers {inventory}"
    cell = '%%cronium -s all --detach -n kernel-dies\nfor i in $(seq 1 100); do echo "n $i"; done; sleep 30\n'
    cell += 'for i in $(seq 101 200); do echo "n $i"; done'
    first = Kernel(env)
    try:
        assert first.run(setup)[0]["status"] == "ok"
        msg_id = first.start(cell)
        first.messages(msg_id, lambda messages: all(f"[{n}] n 100" in text_of(messages) for n in cronium_fleet.names))
    finally:
        first.close()  # SIGKILL: the kernel dies mid-run
    with Store(tmp_path / "home") as store:
        execution_id = store.history().iloc[0]["execution_id"]
        assert store.execution_status(execution_id) == Status.DETACHED
    second = Kernel(env)
    try:
        assert second.run(setup)[0]["status"] == "ok"
        reply, messages = second.run(f"%cronium_attach {execution_id} -o res", timeout=180)
        shown = text_of(messages)
        assert reply["status"] == "ok", shown
        for name in cronium_fleet.names:  # the live view: every line, the missed ones first
            assert [line for line in shown.splitlines() if line.startswith(f"[{name}] n ")] == [
                f"[{name}] n {i}" for i in range(1, 201)
            ], shown
        check = "print(res.status.value, res.logs.groupby('server')['line'].apply(list).map(len).to_dict())"
        _, messages = second.run(check)
        assert text_of(messages).strip() == f"success { {name: 200 for name in sorted(cronium_fleet.names)} }"
    finally:
        second.close()


def test_a_lost_connection_leaves_it_detached_and_attach_picks_it_up(single, tmp_path: Path) -> None:
    fleet, name = single
    started = threading.Event()
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        script = 'echo "n 1"; sleep 5; for i in $(seq 2 50); do echo "n $i"; done'
        job = executor.submit(
            Event(name="link-drops", script=script), name, callbacks=Callbacks(on_line=lambda *line: started.set()),
            detach=True,
        )  # fmt: skip
        assert started.wait(120)

        async def drop_every_connection() -> None:  # the laptop's link goes away (tests only: the pool's insides)
            for group in executor.pool._connections.values():
                for pooled in group:
                    pooled.connection.abort()

        executor._loop_thread.call(drop_every_connection())
        left = job.result(timeout=120)
        assert left.status == Status.DETACHED and left[name].status == Status.DETACHED, left.summary.to_string()
        assert f"ex.attach({job.execution_id!r})" in left[name].error
        result = executor.attach(job.execution_id)
        assert result.ok, result.summary.to_string()
        assert list(result.logs["line"]) == [f"n {i}" for i in range(1, 51)]


def test_another_user_cannot_read_or_stop_a_detached_run(cronium_fleet_factory, tmp_path: Path) -> None:
    """Logged in unprivileged (home dirs readable by others, as Debian makes them), on both
    architectures: the job dir is the run user's alone, and the other user cannot reach it."""
    fleet = cronium_fleet_factory(amd64=1, arm64=1, user="cronium", name_prefix="detach-user-")
    started: set[str] = set()
    event = Event(name="private-run", script="echo private output; sleep 6006", timeout=600)
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        seen = Callbacks(on_line=lambda server, *rest: started.add(server))
        job = executor.submit(event, callbacks=seen, detach=True)
        assert wait_for(lambda: started == set(fleet.names), timeout=180)
        for name in fleet.names:
            home = fleet.exec(name, "stat -c %a /home/cronium").output.strip()
            assert home[-1] in "57", home  # others may enter the home: the dirs below must keep them out
            where = f"/home/cronium/.cache/cronium/runs/jobs/{job_name(job.execution_id, name)}"
            assert fleet.exec(name, f"test -d {where}", user="cronium").exit_code == 0
            for attempt in (f"ls {where}", f"cat {where}/spool", f"sh -c 'echo x > {where}/control'"):
                denied = fleet.exec(name, attempt, user="intruder")
                assert denied.exit_code != 0 and "Permission denied" in denied.output, (attempt, denied.output)
        job.cancel()
        result = job.result(timeout=120)
        assert result.status == Status.CANCELLED, result.summary.to_string()
        for name in fleet.names:
            assert list(result.logs[result.logs["server"] == name]["line"]) == ["private output"]
            assert wait_for(lambda name=name: not processes_matching(fleet, name, r"sleep 6006"), timeout=60)


def test_a_killed_keeper_leaves_no_process_behind(single, tmp_path: Path) -> None:
    """A keeper SIGKILLed (the OOM killer, kill -9) can no longer stop its run at the timeout:
    the listing that finds the run lost stops what is left of its processes, and attach stores
    the output spooled up to then with the reason."""
    fleet, name = single
    execution_id, state = submit_in_child_and_kill(
        fleet, name, tmp_path, {"name": "keeper-killed", "script": "echo up; sleep 6007 & wait", "timeout": 3000}
    )
    assert processes_matching(fleet, name, r"sleep 6007")
    keeper = processes_matching(fleet, name, rf"cronium-runner keeper .*{job_name(execution_id, name)}")
    assert len(keeper) == 1, keeper
    assert fleet.exec(name, f"kill -KILL {keeper[0].split()[0]}").exit_code == 0
    with Executor(fleet.inventory, state_dir=state) as executor:
        listed = executor.detached()
        assert list(listed["state"]) == ["lost"], listed.to_string()
        assert wait_for(lambda: not processes_matching(fleet, name, r"sleep 6007"), timeout=60)
        result = executor.attach(execution_id)
        assert result.status == Status.FAILED, result.summary.to_string()
        assert "keeper process is gone" in (result[name].error or ""), result.summary.to_string()
        assert list(result.logs["line"]) == ["up"]
