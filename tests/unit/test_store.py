"""The SQLite store: migrations, executions through a crash, logs at scale, variables."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cronium_nb.config import state_dir
from cronium_nb.model import Status
from cronium_nb.store import DB_NAME, MIGRATIONS, SCHEMA_VERSION, LogBuffer, LogChunk, Store, StoreError, migrate


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


def test_migrates_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).touch()
    with Store(tmp_path) as store:
        assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    assert "phases" in columns(tmp_path / DB_NAME, "server_results")
    with sqlite3.connect(tmp_path / DB_NAME) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_migrates_from_the_first_version_keeping_data(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    assert migrate(connection, target=1) == 1
    connection.execute(
        "INSERT INTO executions (id, event_name, targets, status, started_at, owner) "
        "VALUES ('old', 'legacy', '[\"a\"]', 'success', 1.0, 'x:1:1')"
    )
    connection.execute("INSERT INTO server_results (execution_id, server, status) VALUES ('old', 'a', 'success')")
    for seq, line in enumerate(["first", "", "third"], start=1):
        connection.execute("INSERT INTO log_lines VALUES ('old', 'a', ?, 2.0, 'stdout', ?)", (seq, line))
    connection.close()
    assert "phases" not in columns(tmp_path / DB_NAME, "server_results")
    with Store(tmp_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        history = store.history()
        assert list(history["execution_id"]) == ["old"] and list(history["status"]) == ["success"]
        assert store.server_results("old")["phases"].tolist() == [{}]
        logs = store.logs("old")
        assert logs["line"].tolist() == ["first", "", "third"] and logs["seq"].tolist() == [1, 2, 3]
    assert columns(tmp_path / DB_NAME, "log_lines") == []  # the table is gone


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this cronium_nb"):
        Store(tmp_path)


def test_execution_lifecycle_and_history(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.start_execution("e1", "hello", ["a", "b"], options={"timeout": 5})
        assert store.execution_status("e1") == Status.RUNNING
        store.update_server("e1", "a", status=Status.SUCCESS, exit_code=0, arch="x86_64", phases={"run": 0.1})
        store.update_server("e1", "b", status=Status.FAILED, exit_code=1, error="exit 1", outputs={"x": 1})
        store.finish_execution("e1", Status.PARTIAL)
        history = store.history()
        row = history.iloc[0]
        assert (row["status"], row["servers_ok"], row["servers"], row["targets"]) == ("partial", 1, 2, "a,b")
        results = store.server_results("e1")
        assert results["status"].tolist() == ["success", "failed"]
        assert results["outputs"].tolist() == [None, {"x": 1}]
        with pytest.raises(ValueError, match="unknown server result field"):
            store.update_server("e1", "a", colour="red")


def test_variables(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.set_variable("global", "count", 1, updated_by="e1/a")
        store.set_variable("global", "count", {"n": 2}, updated_by="e2/b")
        store.set_variable("other", "flag", True)
        assert store.get_variables("global") == {"count": {"n": 2}}
        frame = store.variables()
        assert frame[["scope", "name"]].values.tolist() == [["global", "count"], ["other", "flag"]]
        assert frame["updated_by"].iloc[0] == "e2/b" and pd.isna(frame["updated_by"].iloc[1])


WRITER = """
import sys, time
from cronium_nb.store import LogBuffer, Store
store = Store(sys.argv[1])
store.start_execution("crashy", "crash-event", ["a"])
buffer = LogBuffer(store, batch_size=100)
seq = 0
while True:
    for _ in range(100):
        seq += 1
        buffer.add("crashy", "a", seq, time.time(), "stdout", f"line {seq}")
    print(seq, flush=True)  # a whole batch is committed
"""


def test_killed_writer_leaves_a_consistent_store_with_the_run_interrupted(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        committed = 0
        while committed < 5000:
            committed = int(writer.stdout.readline())
    finally:
        writer.kill()
        writer.wait()
    with Store(tmp_path) as store:
        assert store.interrupted == ["crashy"]
        assert store.execution_status("crashy") == Status.INTERRUPTED
        assert store.server_results("crashy")["status"].tolist() == ["interrupted"]
        logs = store.logs("crashy")
        assert len(logs) >= committed
        assert logs["seq"].tolist() == list(range(1, len(logs) + 1))
        history = store.history()
        assert history.iloc[0]["status"] == "interrupted" and history.iloc[0]["error"]
    with sqlite3.connect(tmp_path / DB_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_live_owner_is_not_interrupted(tmp_path: Path) -> None:
    with Store(tmp_path) as first:
        first.start_execution("live", "e", ["a"])
        with Store(tmp_path) as second:
            assert second.interrupted == []
            assert second.execution_status("live") == Status.RUNNING


def test_a_million_log_lines(tmp_path: Path) -> None:
    total = 1_000_000
    with Store(tmp_path) as store:
        store.start_execution("big", "e", ["a", "b"])
        buffer = LogBuffer(store, batch_size=10_000)
        for seq in range(total):
            buffer.add("big", "ab"[seq % 2], seq, 1700000000.0 + seq / 1000, "stdout", f"line {seq:07d}")
        buffer.flush()
        frame = store.logs("big")
    assert len(frame) == total
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == ["server", "seq", "ts", "stream", "line"]
    a_rows = frame[frame["server"] == "a"]
    assert a_rows["seq"].is_monotonic_increasing and len(a_rows) == total // 2
    assert frame.iloc[-1]["line"] == f"line {total - 1:07d}"


def test_state_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "home"))
    chosen = state_dir()
    assert chosen == tmp_path / "home" and chosen.stat().st_mode & 0o777 == 0o700
    assert state_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("CRONIUM_HOME")
    assert state_dir() == Path("~/.cronium").expanduser()


def test_log_chunks_read_back_as_lines(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.start_execution("chunks", "e", ["a", "b"])
        buffer = LogBuffer(store)
        buffer.add_chunk(LogChunk("chunks", "b", 1, 2, 5.0, "stderr", "b one\nb two"))
        buffer.add_chunk(LogChunk("chunks", "a", 1, 3, 3.0, "stdout", "one\n\nthree"))
        buffer.add_chunk(LogChunk("chunks", "a", 4, 1, 4.0, "stderr", "four"))
        buffer.flush()
        frame = store.logs("chunks")
        only_b = store.logs("chunks", "b")
    assert frame[["server", "seq", "stream", "line"]].values.tolist() == [
        ["a", 1, "stdout", "one"],
        ["a", 2, "stdout", ""],
        ["a", 3, "stdout", "three"],
        ["a", 4, "stderr", "four"],
        ["b", 1, "stderr", "b one"],
        ["b", 2, "stderr", "b two"],
    ]
    assert frame["ts"].dt.second.tolist() == [3, 3, 3, 4, 5, 5]
    assert only_b["line"].tolist() == ["b one", "b two"]


def test_reads_that_continue_a_stream_within_moments_are_stored_as_one_chunk(tmp_path: Path) -> None:
    written: list[list[LogChunk]] = []
    with Store(tmp_path) as store:
        store.start_execution("joined", "e", ["a", "b"])
        buffer = LogBuffer(store, write=lambda chunks: (written.append(list(chunks)), store.append_log_chunks(chunks)))
        buffer.add_chunk(LogChunk("joined", "a", 1, 2, 10.00, "stdout", "one\ntwo"))
        buffer.add_chunk(LogChunk("joined", "b", 1, 1, 10.01, "stdout", "b one"))  # another server between
        buffer.add_chunk(LogChunk("joined", "a", 3, 1, 10.02, "stdout", "three"))  # continues a's: joined
        buffer.add_chunk(LogChunk("joined", "a", 4, 1, 10.03, "stderr", "err"))  # another stream
        buffer.add_chunk(LogChunk("joined", "a", 5, 1, 10.04, "stdout", "five"))  # seq 4 went to stderr
        buffer.add_chunk(LogChunk("joined", "a", 6, 1, 10.50, "stdout", "six"))  # too late to join five
        buffer.flush()
        frame = store.logs("joined", "a")
    assert [(c.server, c.first_seq, c.line_count, c.stream, c.lines) for c in written[0]] == [
        ("a", 1, 3, "stdout", "one\ntwo\nthree"),
        ("b", 1, 1, "stdout", "b one"),
        ("a", 4, 1, "stderr", "err"),
        ("a", 5, 1, "stdout", "five"),
        ("a", 6, 1, "stdout", "six"),
    ]
    assert frame["line"].tolist() == ["one", "two", "three", "err", "five", "six"]
    assert frame["seq"].tolist() == [1, 2, 3, 4, 5, 6]
    assert [round(ts.timestamp(), 2) for ts in frame["ts"]] == [10.0, 10.0, 10.0, 10.03, 10.04, 10.5]


def test_a_joined_chunk_stops_growing_at_its_byte_limit(tmp_path: Path) -> None:
    written: list[LogChunk] = []
    line = "x" * 99
    with Store(tmp_path) as store:
        store.start_execution("capped", "e", ["a"])
        buffer = LogBuffer(store, write=lambda chunks: (written.extend(chunks), store.append_log_chunks(chunks)))
        per_read = 100
        for read in range(40):  # 40 reads of 100 lines, all within moments: 396 KB in all
            text = "\n".join([line] * per_read)
            buffer.add_chunk(LogChunk("capped", "a", read * per_read + 1, per_read, 10.0, "stdout", text))
        buffer.flush()
        frame = store.logs("capped")
    assert len(written) > 1
    assert all(len(chunk.lines) <= LogBuffer.COALESCE_MAX_BYTES for chunk in written)
    assert all(after.first_seq == before.first_seq + before.line_count for before, after in itertools.pairwise(written))
    assert len(frame) == 4000 and frame["seq"].tolist() == list(range(1, 4001))


def test_a_new_store_has_large_pages_and_checkpoints_every_64_mib(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        page_size = store._query("PRAGMA page_size")[0][0]
        checkpoint_pages = store._query("PRAGMA wal_autocheckpoint")[0][0]
        journal = store._query("PRAGMA journal_mode")[0][0]
    assert (page_size, journal) == (16384, "wal")
    assert page_size * checkpoint_pages == 64 * 1024 * 1024


def test_host_facts_are_remembered_per_address(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        assert store.host_facts("root@127.0.0.1:2222") is None
        store.remember_host("root@127.0.0.1:2222", {"machine": "x86_64", "python": None, "home": "/root"})
        store.remember_host("root@127.0.0.1:2222", {"machine": "aarch64", "python": [3, 11], "home": "/root"})
    with Store(tmp_path) as again:
        assert again.host_facts("root@127.0.0.1:2222") == {"machine": "aarch64", "python": [3, 11], "home": "/root"}
        assert again.host_facts("root@127.0.0.1:2223") is None
