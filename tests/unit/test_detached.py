"""Detached runs without a fleet: what attach refuses before anything is sent, and the store's
view of a detached execution whose orchestrator is gone (the fleet tests run them for real:
tests/integration/test_detached.py)."""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cronium_nb import DetachedError, Event, EventError, Executor, Inventory, Server, Status
from cronium_nb.detached import DETACHED_COLUMNS, job_name
from cronium_nb.store import DB_NAME, Store, _process_start_time, current_owner


@pytest.fixture
def executor(tmp_path: Path):
    inventory = Inventory([Server(name="web1", host="127.0.0.1", port=1)])
    with Executor(inventory, state_dir=tmp_path / "state") as executor:
        yield executor


def orphan(state: Path, execution_id: str) -> None:
    """Make an execution's owner a process that is gone (as if it was SIGKILLed)."""
    with sqlite3.connect(state / DB_NAME) as db:
        db.execute("UPDATE executions SET owner = 'gone-host:1:0' WHERE id = ?", (execution_id,))


def test_attach_refuses_what_it_cannot_follow_before_anything_runs(executor: Executor) -> None:
    with pytest.raises(DetachedError, match="no execution 'abc123'"):
        executor.attach("abc123")
    with pytest.raises(DetachedError, match="not an execution id"):
        executor.attach("../x; rm -rf /")
    executor.store.start_execution("plain1", "plain", ["web1"], options={"detach": False})
    with pytest.raises(DetachedError, match="was not detached"):
        executor.attach("plain1")
    executor.store.start_execution("elsewhere1", "other", ["db9"], options={"detach": True})
    with pytest.raises(ValueError, match="db9"):  # not in this executor's inventory
        executor.attach("elsewhere1")
    history = executor.history()  # nothing was started, nor any record adopted
    assert sorted(history["execution_id"]) == ["elsewhere1", "plain1"]
    assert set(history["status"]) == {"running"}


def test_detach_with_api_mode_or_a_bad_spool_limit_is_refused(executor: Executor) -> None:
    with pytest.raises(EventError, match="a detached run cannot use it"):
        executor.submit(Event(name="e", script="true"), "web1", api=True, detach=True)
    for bad in (0, -1, 2.5, 5 * 2**30):
        executor.detached_spool_bytes = bad  # type: ignore[assignment]
        with pytest.raises(DetachedError, match="detached_spool_bytes must be a whole number of bytes"):
            executor.submit(Event(name="e", script="true"), "web1", detach=True)
    assert executor.history().empty  # nothing was started


def test_detach_with_a_rollout_or_become_is_refused_before_anything_runs(executor: Executor) -> None:
    with pytest.raises(EventError, match="a detached run cannot be one"):
        executor.submit(Event(name="e", script="true"), "web1", detach=True, batch_size=1, max_fail=0)
    with pytest.raises(EventError, match="a detached run cannot use become"):
        executor.submit(Event(name="e", script="true", become=True), "web1", detach=True)
    assert executor.history().empty


def test_a_detached_execution_outlives_its_owner_in_the_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with Store(state) as store:
        store.start_execution("det1", "long", ["web1", "web2"], options={"detach": True})
        store.update_server("det1", "web2", status=Status.SUCCESS, exit_code=0)
        store.start_execution("run1", "short", ["web1"], options={})
    orphan(state, "det1")
    orphan(state, "run1")
    with Store(state) as store:
        assert store.execution_status("det1") == Status.DETACHED  # goes on on its servers
        assert store.execution_status("run1") == Status.INTERRUPTED  # ended with its orchestrator
        assert dict(store.server_results("det1")[["server", "status"]].values) == {
            "web1": "detached",
            "web2": "success",
        }
        assert store.detached_executions() == ["det1"]
        store.adopt_execution("det1", ["web1"])  # what attach does first
        assert store.execution_status("det1") == Status.RUNNING
        store.mark_detached("det1", "goes on unfollowed on web1")
        row = store.execution_row("det1")
        assert row is not None and row["status"] == "detached" and row["finished_at"] is None


def test_listing_with_nothing_detached_is_empty(executor: Executor) -> None:
    frame = executor.detached()
    assert frame.empty and tuple(frame.columns) == DETACHED_COLUMNS


def test_job_names_are_file_names_and_differ_per_server() -> None:
    names = {job_name("0123456789ab", server) for server in ("web1", "web 2", "../../etc", "web1 ")}
    assert len(names) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) for name in names)


def test_attach_is_refused_while_another_live_process_follows(tmp_path: Path) -> None:
    """Two followers of one execution would each clear and store its servers' lines (each line
    twice): attach is refused while another process that is alive follows it, and the store's
    adoption is refused too (when that process began following after attach looked)."""
    state = tmp_path / "state"
    inventory = Inventory([Server(name="web1", host="127.0.0.1", port=1)])
    with Executor(inventory, state_dir=state) as executor:
        executor.store.start_execution("det2", "long", ["web1"], options={"detach": True})
    follower = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        owner = f"{socket.gethostname()}:{follower.pid}:{_process_start_time(follower.pid)}"
        with sqlite3.connect(state / DB_NAME) as db:  # as that process's attach leaves it
            db.execute("UPDATE executions SET status = 'running', owner = ? WHERE id = 'det2'", (owner,))
        with Executor(inventory, state_dir=state) as executor:
            message = rf"execution 'det2' is followed by another process now \(pid {follower.pid} on "
            with pytest.raises(DetachedError, match=message):
                executor.attach("det2")
            with pytest.raises(DetachedError, match=message):
                executor.cancel_detached("det2")
            assert executor.store.adopt_execution("det2", ["web1"]) == owner
            row = executor.store.execution_row("det2")
            assert row is not None and row["owner"] == owner  # not adopted
    finally:
        follower.kill()
        follower.wait()
    with Store(state) as store:  # that process is gone: its execution is detached, and adopted
        assert store.execution_status("det2") == Status.DETACHED
        assert store.adopt_execution("det2", ["web1"]) is None
        row = store.execution_row("det2")
        assert row is not None and row["owner"] == current_owner()
