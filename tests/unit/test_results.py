"""ExecutionResult reads: a closed executor's result reads the store without writing to it."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

import cronium_nb.store as store_module
from cronium_nb.model import Status
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.store import DB_NAME, SCHEMA_VERSION, LogChunk, Store, StoreError


def snapshot(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of the database (the file, its WAL and shared memory if any): a hash of the
    contents, size and mtime."""
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.glob(f"{DB_NAME}*"))
    }


def closed_store_result(directory: Path) -> ExecutionResult:
    """A finished execution with logs, next to one left running by a process that is gone (what
    crash recovery would rewrite); the store is closed, as ``Executor.close()`` leaves it."""
    store = Store(directory)
    store.start_execution("done", "hello", ["a"])
    store.append_log_chunks([LogChunk("done", "a", 1, 2, 1.0, "stdout", "one\ntwo")])
    store.update_server("done", "a", status=Status.SUCCESS, exit_code=0)
    store.finish_execution("done", Status.SUCCESS)
    store.start_execution("orphan", "hello", ["a"])
    with store._transaction() as db:
        db.execute("UPDATE executions SET owner = 'another-host:1:1' WHERE id = 'orphan'")
    result = ExecutionResult("done", "hello", Status.SUCCESS, {"a": ServerResult("a", Status.SUCCESS)}, store)
    store.close()
    return result


def test_reading_a_closed_executors_logs_does_not_write_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = closed_store_result(tmp_path)
    before = snapshot(tmp_path)
    assert list(before) == [DB_NAME]  # closing checkpointed the WAL into the file

    def no_writes(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a read ran a migration or crash recovery")

    monkeypatch.setattr(store_module, "migrate", no_writes)
    monkeypatch.setattr(Store, "recover_interrupted", no_writes)
    assert result.logs["line"].tolist() == ["one", "two"]
    assert result.logs["seq"].tolist() == [1, 2]
    assert result.tool_calls.empty

    after = snapshot(tmp_path)
    assert after[DB_NAME] == before[DB_NAME]  # same bytes, size and mtime
    # SQLite may leave an empty WAL and shared-memory file behind a read-only reader; the WAL
    # holds no frame, so nothing was committed.
    assert set(after) <= {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"}
    assert after.get(f"{DB_NAME}-wal", ("", 0, 0))[1] == 0
    with sqlite3.connect(f"{(tmp_path / DB_NAME).as_uri()}?mode=ro", uri=True) as connection:
        status = connection.execute("SELECT status FROM executions WHERE id = 'orphan'").fetchone()[0]
    assert status == Status.RUNNING.value  # crash recovery would have marked it interrupted


def test_the_read_only_store_refuses_writes_and_unknown_files(tmp_path: Path) -> None:
    closed_store_result(tmp_path)
    with Store.open_readonly(tmp_path) as store:
        assert store.logs("done")["line"].tolist() == ["one", "two"]
        assert store.execution_status("orphan") == Status.RUNNING
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.finish_execution("orphan", Status.FAILED)
    with pytest.raises(sqlite3.OperationalError):
        Store.open_readonly(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    with sqlite3.connect(tmp_path / DB_NAME) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        Store.open_readonly(tmp_path)


def test_an_open_executors_result_reads_through_its_store(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.start_execution("run", "hello", ["a"])
        store.append_log_chunks([LogChunk("run", "a", 1, 1, 1.0, "stderr", "oops")])
        result = ExecutionResult("run", "hello", Status.RUNNING, {"a": ServerResult("a")}, store)
        assert result.logs[["stream", "line"]].values.tolist() == [["stderr", "oops"]]
