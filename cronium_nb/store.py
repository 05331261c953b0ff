"""The SQLite store: events, payload versions, executions, per-server results, logs, variables,
file transfers.

One file in the state directory (``cronium.db``), WAL journal, foreign keys on, schema version
in ``PRAGMA user_version`` with migrations applied on open. An execution is written when it
starts and updated as it goes; one found still running when the store is opened, whose owning
process is gone, is marked ``interrupted``. Queries come back as pandas DataFrames.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cronium_nb.errors import CroniumError
from cronium_nb.model import Status

DB_NAME = "cronium.db"

# Each entry moves the schema from version N to N + 1; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        payload_version INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE runner_payloads (
        id INTEGER PRIMARY KEY,
        event_id INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        hash TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (event_id, version)
    );
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        event_id INTEGER REFERENCES events(id) ON DELETE SET NULL,
        event_name TEXT NOT NULL,
        targets TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        options TEXT NOT NULL DEFAULT '{}',
        owner TEXT NOT NULL
    );
    CREATE INDEX executions_by_start ON executions (started_at);
    CREATE TABLE server_results (
        execution_id TEXT NOT NULL REFERENCES executions(id) ON DELETE CASCADE,
        server TEXT NOT NULL,
        arch TEXT,
        status TEXT NOT NULL,
        exit_code INTEGER,
        duration_s REAL,
        deploy TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        outputs TEXT,
        variables TEXT,
        PRIMARY KEY (execution_id, server)
    );
    CREATE TABLE log_lines (
        execution_id TEXT NOT NULL REFERENCES executions(id) ON DELETE CASCADE,
        server TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts REAL NOT NULL,
        stream TEXT NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX log_lines_by_run ON log_lines (execution_id, server, seq);
    CREATE TABLE variables (
        scope TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        updated_by TEXT,
        PRIMARY KEY (scope, name)
    );
    """,
    # 2: per-phase timings per server, the payload version and the error of an execution
    """
    ALTER TABLE server_results ADD COLUMN phases TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE executions ADD COLUMN payload_version INTEGER;
    ALTER TABLE executions ADD COLUMN error TEXT;
    """,
    # 3: logs stored in chunks (one row per block of lines read together, not one per line):
    # a row per line made SQLite the bottleneck of streaming (about 3 us a line).
    """
    CREATE TABLE log_chunks (
        execution_id TEXT NOT NULL REFERENCES executions(id) ON DELETE CASCADE,
        server TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        line_count INTEGER NOT NULL,
        ts REAL NOT NULL,
        stream TEXT NOT NULL,
        lines TEXT NOT NULL
    );
    CREATE INDEX log_chunks_by_run ON log_chunks (execution_id, server, first_seq);
    INSERT INTO log_chunks SELECT execution_id, server, seq, 1, ts, stream, line FROM log_lines;
    DROP TABLE log_lines;
    """,
    # 4: what a probe learnt about each server (architecture, python3, home), so that a new
    # connection to a server seen before can go straight to its runner daemon
    """
    CREATE TABLE hosts (
        address TEXT PRIMARY KEY,
        facts TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 5: tool actions called by scripts in API mode (arguments left out when they hold a secret)
    """
    CREATE TABLE tool_calls (
        execution_id TEXT NOT NULL REFERENCES executions(id) ON DELETE CASCADE,
        server TEXT NOT NULL,
        tool TEXT NOT NULL,
        started_at REAL NOT NULL,
        duration_s REAL NOT NULL,
        ok INTEGER NOT NULL,
        error TEXT,
        arguments TEXT
    );
    CREATE INDEX tool_calls_by_run ON tool_calls (execution_id, started_at);
    """,
    # 6: what kind of failure a server's error is (cronium_nb.errors.ERROR_KINDS)
    """
    ALTER TABLE server_results ADD COLUMN error_kind TEXT;
    """,
    # 7: file transfers (Executor.put / fetch), one row per server, failed and cancelled too
    """
    CREATE TABLE transfers (
        transfer_id TEXT NOT NULL,
        direction TEXT NOT NULL,
        source TEXT NOT NULL,
        server TEXT NOT NULL,
        path TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT,
        status TEXT NOT NULL,
        error TEXT,
        started_at REAL NOT NULL,
        duration_s REAL
    );
    CREATE INDEX transfers_by_time ON transfers (started_at);
    """,
    # 8: rollouts: the execution a retry_failed() reran (retry_of), and each runner build recorded
    # as in place on a server (by its route), for the dry-run plan, which contacts no server
    """
    ALTER TABLE executions ADD COLUMN retry_of TEXT REFERENCES executions(id) ON DELETE SET NULL;
    CREATE TABLE runner_deployments (
        route TEXT NOT NULL,
        build TEXT NOT NULL,
        state TEXT NOT NULL,
        checked_at REAL NOT NULL,
        PRIMARY KEY (route, build)
    );
    """,
    # 9: the Dask worker a server ran on (Executor(cluster=...)); NULL for a local run
    """
    ALTER TABLE server_results ADD COLUMN worker TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
SERVER_RESULT_FIELDS = (
    "arch", "status", "exit_code", "duration_s", "deploy", "attempts", "error", "error_kind", "outputs", "variables",
    "phases", "worker",
)  # fmt: skip
JSON_FIELDS = ("outputs", "variables", "phases")
TRANSFER_ROW = ("server", "path", "bytes", "sha256", "status", "error")  # then started_at, duration_s


class StoreError(CroniumError, RuntimeError):
    """The database is newer than this code, or otherwise unusable."""


def migrate(connection: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply migrations up to ``target``, each in its own transaction; returns the new version."""
    current = connection.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise StoreError(f"database schema version {current} is newer than this cronium_nb ({SCHEMA_VERSION})")
    for version in range(current, target):
        connection.executescript(f"BEGIN;\n{MIGRATIONS[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;")
    return max(current, target)


def _process_start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            return stream.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def current_owner() -> str:
    """Identifies this process across restarts: host, pid and the pid's start time."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start_time(os.getpid())}"


def owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's run cannot be checked; treat it as gone
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _process_start_time(pid) == start


# host:pid:start time, as current_owner() writes it (a pid has at most 7 digits on Linux)
OWNER_PATTERN = re.compile(r"[^:\s]+:[0-9]{1,9}:[0-9]{1,20}")


def owner_ended(owner: str) -> bool:
    """Whether ``owner`` names a process of this machine that has ended. Another machine's
    cannot be checked, and anything not in current_owner()'s form (half written, say) is not
    judged: neither counts as ended, for what would be removed on that ground."""
    if not OWNER_PATTERN.fullmatch(owner):
        return False
    return owner.partition(":")[0] == socket.gethostname() and not owner_alive(owner)


def _other_live_owner(row: Sequence[Any] | None) -> str | None:
    """The owner of an executions row (status, owner) that is running in another live process."""
    if row is None or row[0] != Status.RUNNING.value or row[1] == current_owner() or not owner_alive(row[1]):
        return None
    return str(row[1])


@dataclass(frozen=True)
class PayloadRow:
    id: int
    event_id: int
    version: int
    hash: str
    path: str
    size: int
    created_at: float


# Pages of 16 KiB (new databases; SQLite's default is 4 KiB): stored logs are large rows, and
# with bigger pages their overflow chains cost SQLite about 40% less CPU per byte written.
PAGE_SIZE = 16384
# A checkpoint every 64 MiB of WAL; the WAL file is cut back to that size after one, so a
# large stream does not leave a large file behind.
WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024


class Store:
    """Thread-safe access to the database; one connection guarded by a lock."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / DB_NAME
        self._lock = threading.RLock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before WAL: ignored once it is on
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a killed process
        # Each checkpoint syncs the WAL and the database file: at SQLite's default (every 1000
        # pages) a stream of logs spent more time in fsync than in writing (benchmarks/analysis.md).
        page_size = self._connection.execute("PRAGMA page_size").fetchone()[0]
        self._connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_BYTES // page_size}")
        self._connection.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES}")
        self._connection.execute("PRAGMA foreign_keys = ON")
        self.path.chmod(0o600)
        with self._lock:
            self.schema_version = migrate(self._connection)
        self.interrupted = self.recover_interrupted()

    @classmethod
    def open_readonly(cls, directory: str | os.PathLike[str]) -> Store:
        """The database in ``directory`` opened read-only, for queries only: no migration, no
        crash recovery, no pragma or chmod; a write raises ``sqlite3.OperationalError``. The file
        must exist at this code's schema version (``StoreError`` otherwise)."""
        store = cls.__new__(cls)
        store.path = Path(directory) / DB_NAME
        store._lock = threading.RLock()
        store._connection = sqlite3.connect(
            f"{store.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, isolation_level=None,
            timeout=30,
        )  # fmt: skip
        store.schema_version = store._connection.execute("PRAGMA user_version").fetchone()[0]
        store.interrupted = []
        if store.schema_version != SCHEMA_VERSION:
            store.close()
            raise StoreError(f"database schema version {store.schema_version}, not this cronium_nb's {SCHEMA_VERSION}")
        return store

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, params).fetchall()

    def _frame(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._lock:
            return pd.read_sql_query(sql, self._connection, params=list(params))

    # -- events and payloads

    def upsert_event(self, name: str, script_type: str) -> int:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO events (name, type, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET type = excluded.type, updated_at = excluded.updated_at",
                (name, script_type, now, now),
            )
            return db.execute("SELECT id FROM events WHERE name = ?", (name,)).fetchone()[0]

    def event_id(self, name: str) -> int | None:
        """The stable id of the event called ``name`` (what ``cronium.event id`` prints), or None."""
        rows = self._query("SELECT id FROM events WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def event_payload_version(self, event_id: int) -> int:
        return self._query("SELECT payload_version FROM events WHERE id = ?", (event_id,))[0][0]

    def add_payload(self, event_id: int, sha256: str, path: str, size: int) -> PayloadRow:
        """Record a new payload version of the event (its ``payload_version`` + 1)."""
        now = time.time()
        with self._transaction() as db:
            version = db.execute("SELECT payload_version FROM events WHERE id = ?", (event_id,)).fetchone()[0] + 1
            cursor = db.execute(
                "INSERT INTO runner_payloads (event_id, version, hash, path, size, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, version, sha256, path, size, now),
            )
            db.execute("UPDATE events SET payload_version = ?, updated_at = ? WHERE id = ?", (version, now, event_id))
        payload_id = cursor.lastrowid
        if payload_id is None:  # sqlite3 sets it after every single-row INSERT
            raise StoreError("the new payload row has no id")
        return PayloadRow(payload_id, event_id, version, sha256, path, size, now)

    def payloads(self, event_id: int | None = None) -> list[PayloadRow]:
        """Payload rows, newest version first."""
        where, params = ("WHERE event_id = ?", (event_id,)) if event_id is not None else ("", ())
        rows = self._query(
            f"SELECT id, event_id, version, hash, path, size, created_at FROM runner_payloads {where} "
            "ORDER BY event_id, version DESC",
            params,
        )
        return [PayloadRow(*row) for row in rows]

    def delete_payloads(self, ids: Iterable[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM runner_payloads WHERE id = ?", [(i,) for i in ids])

    def payloads_frame(self) -> pd.DataFrame:
        return self._frame(
            "SELECT e.name AS event, p.version, p.hash, p.size, p.path, p.created_at FROM runner_payloads p "
            "JOIN events e ON e.id = p.event_id ORDER BY e.name, p.version"
        )

    # -- executions

    def start_execution(
        self,
        execution_id: str,
        event_name: str,
        targets: Sequence[str],
        *,
        event_id: int | None = None,
        payload_version: int | None = None,
        options: dict[str, Any] | None = None,
        retry_of: str | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO executions (id, event_id, event_name, targets, status, started_at, options, owner, "
                "payload_version, retry_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    execution_id, event_id, event_name, json.dumps(list(targets)), Status.RUNNING.value,
                    time.time(), json.dumps(options or {}), current_owner(), payload_version, retry_of,
                ),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO server_results (execution_id, server, status) VALUES (?, ?, ?)",
                [(execution_id, server, Status.PENDING.value) for server in targets],
            )

    def update_server(self, execution_id: str, server: str, **fields: Any) -> None:
        """Set some of a server's result fields (see ``SERVER_RESULT_FIELDS``)."""
        unknown = set(fields) - set(SERVER_RESULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown server result field(s): {', '.join(sorted(unknown))}")
        values = [
            json.dumps(v) if k in JSON_FIELDS else str(v) if isinstance(v, Status) else v for k, v in fields.items()
        ]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            db.execute(
                f"UPDATE server_results SET {assignments} WHERE execution_id = ? AND server = ?",
                (*values, execution_id, server),
            )

    def finish_execution(self, execution_id: str, status: Status, error: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE executions SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                (status.value, time.time(), error, execution_id),
            )

    def recover_interrupted(self) -> list[str]:
        """Mark executions left running by a process that is gone as ``interrupted``."""
        running = self._query(
            "SELECT id, owner, json_extract(options, '$.detach') FROM executions WHERE status = ?",
            (Status.RUNNING.value,),
        )
        dead = [execution_id for execution_id, owner, detach in running if not owner_alive(owner) and not detach]
        unfinished = (Status.PENDING.value, Status.RUNNING.value)
        with self._transaction() as db:
            for execution_id, owner, detach in running:
                if detach and not owner_alive(owner):  # it goes on on its servers: ex.attach() follows it
                    db.execute("UPDATE executions SET status = ? WHERE id = ?", (Status.DETACHED.value, execution_id))
                    db.execute(
                        "UPDATE server_results SET status = ? WHERE execution_id = ? AND status IN (?, ?)",
                        (Status.DETACHED.value, execution_id, *unfinished),
                    )
            for execution_id in dead:
                last_log = db.execute(
                    "SELECT MAX(ts) FROM log_chunks WHERE execution_id = ?", (execution_id,)
                ).fetchone()
                db.execute(
                    "UPDATE executions SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                    (
                        Status.INTERRUPTED.value, last_log[0], "the orchestrator process ended during the run",
                        execution_id,
                    ),
                )  # fmt: skip
                db.execute(
                    "UPDATE server_results SET status = ? WHERE execution_id = ? AND status IN (?, ?)",
                    (Status.INTERRUPTED.value, execution_id, *unfinished),
                )
        return dead

    # -- detached executions (see cronium_nb.detached)

    def execution_row(self, execution_id: str) -> dict[str, Any] | None:
        """An execution's row (``options`` and ``targets`` parsed), or None."""
        rows = self._query(
            "SELECT id, event_id, event_name, targets, status, started_at, finished_at, options, owner, "
            "payload_version, error FROM executions WHERE id = ?",
            (execution_id,),
        )
        if not rows:
            return None
        names = ("id", "event_id", "event_name", "targets", "status", "started_at", "finished_at", "options", "owner",
                 "payload_version", "error")  # fmt: skip
        row = dict(zip(names, rows[0], strict=True))
        row["targets"], row["options"] = json.loads(row["targets"]), json.loads(row["options"])
        return row

    def detached_executions(self) -> list[str]:
        """Ids of detached executions not completed yet (running or detached), oldest first."""
        rows = self._query(
            "SELECT id FROM executions WHERE json_extract(options, '$.detach') AND status IN (?, ?) "
            "ORDER BY started_at",
            (Status.RUNNING.value, Status.DETACHED.value),
        )
        return [row[0] for row in rows]

    def live_follower(self, execution_id: str) -> str | None:
        """The owner of a running execution when it is another process that is alive (it follows
        the execution now), else None."""
        rows = self._query("SELECT status, owner FROM executions WHERE id = ?", (execution_id,))
        return _other_live_owner(rows[0] if rows else None)

    def adopt_execution(self, execution_id: str, servers: Sequence[str]) -> str | None:
        """This process follows the execution from now on (``attach``): it is running again, owned
        here, and the logs of ``servers`` are cleared (their runs' spools are sent again, whole).
        Not while another live process follows it (two followers would store every line twice):
        then nothing changes and that process's owner string is returned."""
        with self._transaction() as db:
            row = db.execute("SELECT status, owner FROM executions WHERE id = ?", (execution_id,)).fetchone()
            if follower := _other_live_owner(row):
                return follower
            db.execute(
                "UPDATE executions SET status = ?, owner = ?, finished_at = NULL, error = NULL WHERE id = ?",
                (Status.RUNNING.value, current_owner(), execution_id),
            )
            for server in servers:
                db.execute("DELETE FROM log_chunks WHERE execution_id = ? AND server = ?", (execution_id, server))
                db.execute(
                    "UPDATE server_results SET status = ? WHERE execution_id = ? AND server = ?",
                    (Status.RUNNING.value, execution_id, server),
                )
        return None

    def mark_detached(self, execution_id: str, error: str) -> None:
        """The execution goes on on some servers that nobody follows now."""
        with self._transaction() as db:
            db.execute(
                "UPDATE executions SET status = ?, finished_at = NULL, error = ? WHERE id = ?",
                (Status.DETACHED.value, error, execution_id),
            )

    def execution_status(self, execution_id: str) -> Status:
        rows = self._query("SELECT status FROM executions WHERE id = ?", (execution_id,))
        if not rows:
            raise KeyError(f"no execution {execution_id!r}")
        return Status(rows[0][0])

    def history(self, limit: int = 50) -> pd.DataFrame:
        """Recent executions, newest first, with per-status server counts."""
        frame = self._frame(
            "SELECT x.id AS execution_id, x.event_name AS event, x.status, x.started_at, x.finished_at, "
            "x.payload_version, x.targets, "
            "SUM(r.status = 'success') AS servers_ok, SUM(r.status IN ('failed', 'timeout', 'cancelled')) "
            "AS servers_failed, SUM(r.status = 'skipped') AS servers_skipped, COUNT(r.server) AS servers, "
            "x.retry_of, x.error "
            "FROM executions x LEFT JOIN server_results r ON r.execution_id = x.id "
            "GROUP BY x.id ORDER BY x.started_at DESC LIMIT ?",
            (limit,),
        )
        for column in ("started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], unit="s", utc=True)
        frame["duration_s"] = (frame["finished_at"] - frame["started_at"]).dt.total_seconds()
        frame["targets"] = frame["targets"].map(lambda text: ",".join(json.loads(text)))
        return frame

    def server_results(self, execution_id: str) -> pd.DataFrame:
        frame = self._frame(
            "SELECT server, arch, status, exit_code, duration_s, deploy, attempts, error, error_kind, outputs, "
            "variables, phases, worker FROM server_results WHERE execution_id = ? ORDER BY rowid",
            (execution_id,),
        )
        for column in JSON_FIELDS:
            frame[column] = frame[column].map(lambda text: json.loads(text) if isinstance(text, str) else None)
        return frame

    # -- logs

    def append_log_chunks(self, chunks: Sequence[LogChunk]) -> None:
        """Insert log chunks in one transaction."""
        if chunks:
            with self._transaction() as db:
                db.executemany("INSERT INTO log_chunks VALUES (?, ?, ?, ?, ?, ?, ?)", chunks)

    def logs(self, execution_id: str, server: str | None = None) -> pd.DataFrame:
        """One row per line: server, seq, ts, stream, line (lines of one chunk share its ts)."""
        where, params = "execution_id = ?", [execution_id]
        if server is not None:
            where, params = where + " AND server = ?", [*params, server]
        with self._lock:
            chunks = self._connection.execute(
                f"SELECT server, first_seq, ts, stream, lines FROM log_chunks WHERE {where} ORDER BY server, first_seq",
                params,
            ).fetchall()
        return _explode_chunks(chunks)

    # -- tool calls

    def record_tool_call(
        self,
        execution_id: str,
        server: str,
        tool: str,
        *,
        started_at: float,
        duration_s: float,
        error: str | None,
        arguments: str | None,
    ) -> None:
        """One tool action call; ``arguments`` is their JSON text, or None to leave them out."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tool_calls VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (execution_id, server, tool, started_at, duration_s, error is None, error, arguments),
            )

    # -- file transfers (cronium_nb.transfer)

    def record_transfer(
        self, transfer_id: str, direction: str, source: str, started_at: float, rows: Sequence[dict[str, Any]]
    ) -> None:
        """One transfer's rows (server, path, bytes, sha256, status, error, duration_s)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        transfer_id,
                        direction,
                        source,
                        *(row[name] for name in TRANSFER_ROW),
                        started_at,
                        row["duration_s"],
                    )
                    for row in rows
                ],
            )

    def transfers(self, limit: int = 50) -> pd.DataFrame:
        """The rows of the last ``limit`` transfers, newest first."""
        frame = self._frame(
            "SELECT transfer_id, direction, source, server, path, bytes, sha256, status, error, started_at, "
            "duration_s FROM transfers WHERE transfer_id IN (SELECT transfer_id FROM transfers "
            "GROUP BY transfer_id ORDER BY MAX(started_at) DESC LIMIT ?) ORDER BY started_at DESC, rowid",
            (limit,),
        )
        frame["started_at"] = pd.to_datetime(frame["started_at"], unit="s", utc=True)
        return frame

    def tool_calls(self, execution_id: str) -> pd.DataFrame:
        """server, tool, started_at, duration_s, ok, error, arguments (parsed; None when withheld)."""
        frame = self._frame(
            "SELECT server, tool, started_at, duration_s, ok, error, arguments FROM tool_calls "
            "WHERE execution_id = ? ORDER BY started_at",
            (execution_id,),
        )
        frame["started_at"] = pd.to_datetime(frame["started_at"], unit="s", utc=True)
        frame["ok"] = frame["ok"].astype(bool)
        frame["arguments"] = [json.loads(text) if isinstance(text, str) else None for text in frame["arguments"]]
        return frame

    # -- hosts

    def host_facts(self, address: str) -> dict[str, Any] | None:
        """What the last probe of ``address`` (``user@host:port``) found, or None."""
        rows = self._query("SELECT facts FROM hosts WHERE address = ?", (address,))
        return json.loads(rows[0][0]) if rows else None

    def remember_host(self, address: str, facts: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO hosts (address, facts, updated_at) VALUES (?, ?, ?) ON CONFLICT (address) "
                "DO UPDATE SET facts = excluded.facts, updated_at = excluded.updated_at",
                (address, json.dumps(facts, sort_keys=True), time.time()),
            )

    # -- runner deployments (what the dry-run plan knows without contacting a server)

    def record_runner(self, route: str, build: str, state: str) -> None:
        """The runner ``build`` (its remote name) was found in place, or put there, on ``route``."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runner_deployments (route, build, state, checked_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (route, build) DO UPDATE SET state = excluded.state, checked_at = excluded.checked_at",
                (route, build, state, time.time()),
            )

    def runner_recorded(self, route: str, build: str) -> float | None:
        """When ``build`` was last recorded in place on ``route`` (epoch seconds), or None."""
        rows = self._query("SELECT checked_at FROM runner_deployments WHERE route = ? AND build = ?", (route, build))
        return rows[0][0] if rows else None

    # -- variables

    def set_variable(self, scope: str, name: str, value: Any, updated_by: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO variables (scope, name, value, updated_at, updated_by) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                (scope, name, json.dumps(value), time.time(), updated_by),
            )

    def delete_variables(self, scope: str) -> None:
        """Forget every variable of ``scope`` (a Dask agent's per-execution copy, once it is done)."""
        with self._transaction() as db:
            db.execute("DELETE FROM variables WHERE scope = ?", (scope,))

    def get_variables(self, scope: str) -> dict[str, Any]:
        rows = self._query("SELECT name, value FROM variables WHERE scope = ? ORDER BY name", (scope,))
        return {name: json.loads(value) for name, value in rows}

    def variables(self, scope: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE scope = ?", (scope,)) if scope is not None else ("", ())
        frame = self._frame(
            f"SELECT scope, name, value, updated_at, updated_by FROM variables {where} ORDER BY scope, name", params
        )
        frame["value"] = frame["value"].map(json.loads)
        frame["updated_at"] = pd.to_datetime(frame["updated_at"], unit="s", utc=True)
        return frame


class LogChunk(NamedTuple):
    """Consecutive lines of one stream of one server, read at ``ts``, joined by newlines."""

    execution_id: str
    server: str
    first_seq: int
    line_count: int
    ts: float
    stream: str
    lines: str


@dataclass
class _PendingChunk:
    """A chunk in a :class:`LogBuffer`, still open to the lines that continue it."""

    execution_id: str
    server: str
    first_seq: int
    line_count: int
    ts: float
    stream: str
    texts: list[str]
    size: int

    @property
    def next_seq(self) -> int:
        return self.first_seq + self.line_count

    def joined(self) -> LogChunk:
        return LogChunk(self.execution_id, self.server, self.first_seq, self.line_count, self.ts, self.stream,
                        "\n".join(self.texts))  # fmt: skip


def _explode_chunks(rows: list[tuple[str, int, float, str, str]]) -> pd.DataFrame:
    """One row per line from stored chunks (server, first_seq, ts, stream, lines), built column
    by column: each chunk's fields repeated by its line count. Each text is split on its own
    (its line count is the split's length): joining them all to split once copied the whole
    text and counted its newlines apart, a third of the time for 2 million lines."""
    lines_by_chunk = [row[4].split("\n") for row in rows]
    counts = np.fromiter(map(len, lines_by_chunk), dtype=np.int64, count=len(rows))
    first_row = np.cumsum(counts) - counts
    first_seqs = np.fromiter((row[1] for row in rows), dtype=np.int64, count=len(rows))
    stamps_ns = np.fromiter((round(row[2] * 1e9) for row in rows), dtype=np.int64, count=len(rows))

    def repeated(field: int) -> np.ndarray:
        return np.repeat(np.array([row[field] for row in rows], dtype=object), counts)

    return pd.DataFrame(
        {
            "server": repeated(0),
            "seq": np.repeat(first_seqs - first_row, counts) + np.arange(counts.sum(), dtype=np.int64),
            "ts": pd.to_datetime(np.repeat(stamps_ns, counts), utc=True),
            "stream": repeated(3),
            "line": np.fromiter(itertools.chain.from_iterable(lines_by_chunk), dtype=object, count=counts.sum()),
        }
    )


class LogBuffer:
    """Collects log chunks and writes them in batches (never a transaction per line or chunk):
    when ``batch_size`` chunks have been added or ``batch_bytes`` of text are waiting, or on
    :meth:`flush`.
    ``write`` writes one batch (default: ``store.append_log_chunks``; the executor queues it on
    its store thread instead).

    A chunk that continues the waiting chunk of its server and stream (the next seq) and arrived
    within ``COALESCE_S`` of its start is joined to it: a script that prints fast reaches us in
    many small reads, and a stored row per read made reading 2 million lines back take seconds.
    The joined lines keep the first read's ts, so a line's ts is when it arrived, within
    ``COALESCE_S``. A joined chunk stops growing at ``COALESCE_MAX_BYTES``: SQLite spends more
    CPU per byte on a row of megabytes than on rows of a few hundred kilobytes."""

    COALESCE_S = 0.05
    COALESCE_MAX_BYTES = 256 * 1024

    def __init__(
        self,
        store: Store,
        batch_size: int = 2000,
        batch_bytes: int = 4 * 1024 * 1024,
        *,
        write: Callable[[Sequence[LogChunk]], object] | None = None,
    ) -> None:
        self._write = write or store.append_log_chunks
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._chunks: list[_PendingChunk] = []
        self._open: dict[tuple[str, str, str], _PendingChunk] = {}  # (execution, server, stream)
        self._added = 0  # chunks added since the last flush, joined ones too
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, execution_id: str, server: str, seq: int, ts: float, stream: str, line: str) -> None:
        """One line (a chunk of one)."""
        self.add_chunk(LogChunk(execution_id, server, seq, 1, ts, stream, line))

    def add_chunk(self, chunk: LogChunk) -> None:
        key = (chunk.execution_id, chunk.server, chunk.stream)
        with self._lock:
            waiting = self._open.get(key)
            size = len(chunk.lines)
            if (
                waiting is not None
                and waiting.next_seq == chunk.first_seq
                and chunk.ts - waiting.ts <= self.COALESCE_S
                and waiting.size + size <= self.COALESCE_MAX_BYTES
            ):
                waiting.texts.append(chunk.lines)
                waiting.line_count += chunk.line_count
                waiting.size += size
            else:
                waiting = _PendingChunk(chunk.execution_id, chunk.server, chunk.first_seq, chunk.line_count,
                                        chunk.ts, chunk.stream, [chunk.lines], size)  # fmt: skip
                self._chunks.append(waiting)
                self._open[key] = waiting
            self._added += 1
            self._bytes += size
            full = self._added >= self._batch_size or self._bytes >= self._batch_bytes
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._chunks = self._chunks, []
            self._open.clear()
            self._added = self._bytes = 0
        if pending:
            self._write([chunk.joined() for chunk in pending])
