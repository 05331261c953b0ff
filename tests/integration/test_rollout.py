"""Safe rollouts and parameterised notebooks on the fleet (3 amd64 + 3 arm64 servers): batches
that stop past max_fail (the rest skipped, never started), retry_failed(), a dry run that
touches no server, the confirmation of a cell aimed at many servers, and papermill."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from cronium_nb import Event, Executor, Fleet, SSHOptions, Status
from cronium_nb.notebooks import NOTEBOOKS
from tests.integration.test_notebooks import Kernel, idle, text_of

pytestmark = pytest.mark.fleet

# The inventory's order, which batches follow: [amd64-1, amd64-2], [amd64-3, arm64-1], [arm64-2, arm64-3]
ORDER = ["amd64-1", "amd64-2", "amd64-3", "arm64-1", "arm64-2", "arm64-3"]
BROKEN = "/root/rollout-broken"  # a server with this file fails the event
RUNS = "/root/rollout-runs"  # every run appends its execution id here: what ran where
SCRIPT = f"""
echo "$(cronium.event execution_id)" >> {RUNS}
if [ -e {BROKEN} ]; then echo "broken on $(cronium.event server)" >&2; exit 3; fi
cronium.output machine "$(uname -m)"
"""
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


@pytest.fixture(scope="module")
def fleet(cronium_fleet_factory) -> Fleet:
    return cronium_fleet_factory(amd64=3, arm64=3)


@pytest.fixture
def inventory_file(fleet: Fleet, tmp_path: Path) -> Path:
    path = tmp_path / "servers.yaml"
    servers = [
        {"name": s.name, "host": s.host, "port": s.port, "key_path": s.key_path, "known_hosts": s.known_hosts}
        for s in fleet.servers
    ]
    path.write_text(yaml.safe_dump({"servers": servers}))
    return path


def ran(fleet: Fleet, execution_id: str) -> list[str]:
    """The servers on which the execution's script started (it wrote its id first thing)."""
    return [name for name in ORDER if execution_id in fleet.exec(name, f"cat {RUNS} 2>/dev/null").output.split()]


def snapshot(fleet: Fleet, name: str) -> tuple[list[str], str]:
    """The container's processes (pid and command line, the inspecting ps left out) and the
    files under /root, /tmp and /home (path, size, mtime)."""
    processes = fleet.exec(name, ["ps", "-eo", "pid,args"]).output.splitlines()
    files = fleet.exec(name, ["find", "/root", "/tmp", "/home", "-xdev", "-printf", "%p %s %T@\n"]).output
    return [line for line in processes if not line.split(None, 1)[-1].startswith("ps -eo")], files


def tcp_connections_accepted(fleet: Fleet, name: str) -> int:
    """How many TCP connections the container's network namespace ever accepted (the kernel's
    PassiveOpens counter): every SSH connection to its sshd, however short, counts; a docker
    exec does not."""
    header, values = [line.split() for line in fleet.exec(name, ["cat", "/proc/net/snmp"]).output.splitlines()
                      if line.startswith("Tcp:")]  # fmt: skip
    return int(values[header.index("PassiveOpens")])


def wait_for_no_ssh_sessions(fleet: Fleet) -> None:
    """Until the closed executor's sessions and runners are gone on every server (bounded)."""
    deadline = time.monotonic() + 60
    for name in ORDER:
        while any(word in fleet.exec(name, ["ps", "-eo", "args"]).output for word in ("sshd: root", "cronium-runner")):
            assert time.monotonic() < deadline, f"{name}: ssh sessions or runners still there"
            time.sleep(0.2)


@pytest.fixture
def text_kernel(tmp_path: Path) -> Iterator[Kernel]:
    kernel = Kernel({"CRONIUM_DISPLAY": "text", "CRONIUM_HOME": str(tmp_path / "home")})
    yield kernel
    kernel.close()


# First in this module, so that no runner daemon of an earlier test lives on the servers while
# their process lists are compared.
def test_a_dry_run_touches_no_server(fleet: Fleet, inventory_file: Path, tmp_path: Path, text_kernel) -> None:
    # One earlier run, from this state dir, on amd64-1: the plan knows its runner is in place there.
    # (No runner daemon, so nothing of it lives on to start processes during the check.)
    options = SSHOptions(runner_daemon_idle_timeout=0)
    with Executor(fleet.inventory, state_dir=tmp_path / "home", ssh_options=options) as executor:
        assert executor.run(Event(name="warm", script="true", timeout=120), servers=["amd64-1"]).ok
    wait_for_no_ssh_sessions(fleet)
    reply, _ = text_kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory_file}")
    assert reply["status"] == "ok"
    accepted = {name: tcp_connections_accepted(fleet, name) for name in ORDER}
    assert accepted["amd64-1"] >= 1  # the counter sees our connections: the warm run's
    before = {name: snapshot(fleet, name) for name in ORDER}

    reply, messages = text_kernel.run(
        "%%cronium -s all --batch 2 --max-fail 1 -n dry -o plan --dry-run\necho would run", timeout=60
    )

    assert reply["status"] == "ok", text_of(messages)
    for name in ORDER:
        assert tcp_connections_accepted(fleet, name) == accepted[name], f"{name}: connected to during the dry run"
        assert snapshot(fleet, name) == before[name], f"{name}: its processes or files changed"
    assert "nothing sent" in text_of(messages)
    reply, messages = text_kernel.run(
        "import json\nprint(json.dumps([plan.servers, [int(b) for b in plan.targets['batch']], "
        "list(plan.targets['runner_cached']), plan.manifest['name'], plan.checksum]))"
    )
    servers, batches, cached, event_name, checksum = json.loads(text_of(messages))
    assert servers == fleet.names and batches == [1, 1, 2, 2, 3, 3] and event_name == "dry"
    assert cached == [name == "amd64-1" or None for name in servers]  # known in place, or unknown
    assert len(checksum) == 64
    reply, messages = text_kernel.run("history = %cronium_history\nprint(list(history['event']))")
    assert text_of(messages).strip() == "['warm']"  # the dry run ran nothing and recorded nothing


def test_a_rollout_stops_after_the_batch_that_crossed_max_fail(fleet: Fleet, executor_factory) -> None:
    assert fleet.names == ORDER
    executor = executor_factory(fleet.inventory)
    event = Event(name="rollout", script=SCRIPT, timeout=120)
    failing = ["amd64-2", "arm64-1"]  # one in batch 1 (at the limit: go on), one in batch 2 (past it: stop)
    for name in failing:
        fleet.exec(name, f"touch {BROKEN}")
    accepted = {name: tcp_connections_accepted(fleet, name) for name in ORDER}
    try:
        res = executor.run(event, servers="all", batch_size=2, max_fail=1)
    finally:
        for name in failing:
            fleet.exec(name, f"rm -f {BROKEN}")

    statuses = dict(zip(res.summary["server"], res.summary["status"], strict=True))
    assert statuses == {
        "amd64-1": "success", "amd64-2": "failed", "amd64-3": "success", "arm64-1": "failed",
        "arm64-2": "skipped", "arm64-3": "skipped",
    }, res.summary.to_string()  # fmt: skip
    assert res.status == Status.PARTIAL and res.counts == {"success": 2, "failed": 2, "skipped": 2}
    assert ran(fleet, res.execution_id) == ["amd64-1", "amd64-2", "amd64-3", "arm64-1"]
    assert tcp_connections_accepted(fleet, "arm64-1") > accepted["arm64-1"]  # the counter sees a run
    for name in ("arm64-2", "arm64-3"):  # never started: no connection, no output, no deployment
        assert tcp_connections_accepted(fleet, name) == accepted[name]
        assert res[name].error.startswith("skipped: the rollout stopped after batch 2 of 3: 2 server(s)")
        assert res[name].arch is None and res[name].deploy is None and not res[name].phases
        assert res.logs.query("server == @name").empty
    for name in failing:
        assert res[name].error_kind == "script" and res[name].exit_code == 3
        assert f"broken on {name}" in res.logs.query("server == @name")["line"].tolist()
    stored = executor.store.server_results(res.execution_id).set_index("server")["status"]
    assert stored.to_dict() == statuses

    retry = res.retry_failed()  # the broken files are gone: the rest now succeed

    again = ["amd64-2", "arm64-1", "arm64-2", "arm64-3"]  # failed and skipped; not the two that succeeded
    assert list(retry.servers) == again
    assert retry.status == Status.SUCCESS, retry.summary.to_string()
    assert ran(fleet, retry.execution_id) == again
    assert retry.retry_of == res.execution_id
    frame = retry.outputs_frame().set_index("server")
    assert frame["machine"].to_dict() == {name: MACHINES[fleet.member(name).arch] for name in again}
    history = executor.history().set_index("execution_id")
    assert history.loc[retry.execution_id, "retry_of"] == res.execution_id
    assert history.loc[res.execution_id, "servers_skipped"] == 2


def input_requests(kernel: Kernel, timeout: float = 60) -> dict:
    return kernel.client.get_stdin_msg(timeout=timeout)


def test_a_cell_aimed_at_many_servers_asks_first(fleet: Fleet, inventory_file: Path, text_kernel) -> None:
    kernel = text_kernel
    kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory_file}")
    _, messages = kernel.run("before = %cronium_confirm_above\nafter = %cronium_confirm_above 1\nprint(before, after)")
    assert text_of(messages).strip() == "20 1"
    cell = "%%cronium -s amd64-1,arm64-1 -o res{n}\necho confirmed on $(hostname)"

    # bad rollout settings are one-line usage errors, found before anyone is asked
    for flags, expected in {
        "--batch 0": "batch_size must be a whole number of servers, 1 or more, got 0",
        "--batch 2 --max-fail 1.5": "max_fail as a fraction must be between 0 and 1 (exclusive), got 1.5",
        "--max-fail many": "argument --max-fail: expected a count or a fraction, got 'many'",
    }.items():
        _reply, messages = kernel.run(f"%%cronium -s all {flags}\necho hi")
        shown = text_of(messages)
        assert f"UsageError: {expected}" in shown and "Traceback" not in shown, (flags, shown)

    # headless (no stdin, as papermill and nbclient run it): refused before anything runs
    msg_id = kernel.client.execute(cell.format(n=1), allow_stdin=False)
    shown = text_of(kernel.messages(msg_id, idle))
    assert "aimed at 2 servers, more than confirm_above=1" in shown and "add --yes" in shown, shown

    # interactive: the kernel asks on stdin; "n" refuses, "y" runs
    for answer, expected in (("n", "not run"), ("y", "confirmed on")):
        msg_id = kernel.client.execute(cell.format(n=2 if answer == "n" else 3), allow_stdin=True)
        request = input_requests(kernel)
        assert request["msg_type"] == "input_request"
        assert "aimed at 2 servers" in request["content"]["prompt"] and "[y/N]" in request["content"]["prompt"]
        kernel.client.input(answer)
        shown = text_of(kernel.messages(msg_id, idle, timeout=180))
        assert expected in shown, shown

    # --yes: no question, even headless
    msg_id = kernel.client.execute(cell.replace("-o res{n}", "-o res4 --yes"), allow_stdin=False)
    shown = text_of(kernel.messages(msg_id, idle, timeout=180))
    assert "confirmed on" in shown and "confirm_above" not in shown, shown

    _, messages = kernel.run("history = %cronium_history\nprint(len(history), res3.status.value, res4.status.value)")
    assert text_of(messages).strip() == "2 success success"  # the refused cells ran nothing


def test_papermill_runs_the_parameterised_notebook_headless(
    fleet: Fleet, inventory_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "home"))  # the kernel inherits it
    monkeypatch.delenv("CRONIUM_DISPLAY", raising=False)  # papermill alone must give plain text
    result_path = tmp_path / "result.json"
    output_path = tmp_path / "out.ipynb"

    papermill.execute_notebook(
        str(NOTEBOOKS / "07-parameterised-rollout.ipynb"),
        str(output_path),
        parameters={
            "inventory_path": str(inventory_file),
            "servers": "amd64-2,arm64-2",
            "event_input": {"n": 12},
            "result_path": str(result_path),
        },
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )

    result = json.loads(result_path.read_text())
    assert result["status"] == "success" and result["counts"] == {"success": 2}
    assert result["outputs"] == {
        "amd64-2": {"n": 12, "square": 144, "machine": "x86_64"},
        "arm64-2": {"n": 12, "square": 144, "machine": "aarch64"},
    }
    notebook = nbformat.read(output_path, as_version=4)
    injected = [cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert injected and 'event_input = {"n": 12}' in injected[0].source
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    texts = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    assert "[amd64-2] n = 12 on x86_64" in texts and "[arm64-2] n = 12 on aarch64" in texts  # live lines, as text
    assert "all checks passed" in texts
    rich = [kind for output in outputs for kind in output.get("data", {}) if kind != "text/plain"]
    assert rich == [], f"headless outputs should be plain text, got {rich}"
