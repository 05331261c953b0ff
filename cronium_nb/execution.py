"""One execution while it runs: its servers' results, its output on the way to the store, and
the fan-out over its servers (on the executor's loop).

:class:`Execution` holds the state (the results, each server's line numbering, how much output
is stored and how much was dropped past ``max_log_bytes``) and runs the servers: each in a
:class:`~cronium_nb.server_run.ServerRun`, at most ``concurrency`` at once, the others cancelled
at the first failure when ``continue_on_failure`` is off. Every store write goes through the
store's worker thread; the execution's last one is awaited before its result is handed back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cronium_nb.model import Event, Server, Status
from cronium_nb.payload import PreparedPayload
from cronium_nb.redaction import Redactor
from cronium_nb.results import ExecutionResult, ServerResult, overall_status
from cronium_nb.rollout import Rollout
from cronium_nb.ssh.remote_run import uncancel, uninterrupted
from cronium_nb.store import LogBuffer, LogChunk
from cronium_nb.store_worker import StoreWorker

DEFAULT_MAX_LOG_BYTES = 2**30  # stored log text per execution; a runaway script cannot fill the disk
LOG_FLUSH_INTERVAL_S = 0.5
# Log text queued for the store's thread and not written yet; past it, reading the servers'
# output waits (the runners then wait on SSH flow control), so memory stays bounded.
MAX_LOG_BYTES_IN_FLIGHT = 32 * 2**20
log = logging.getLogger("cronium_nb.execution")


@dataclass
class Callbacks:
    """Live notifications from the executor's thread (keep them quick; they run on its loop).

    ``on_line(server, stream, text, ts)`` for each output line; ``on_status(result)`` when a
    server's status or phase changes; ``on_deploy_failed(server, attempt, reason)``;
    ``on_variable(server, name, value)`` when a script sets a variable in API mode.
    """

    on_line: Callable[[str, str, str, float], None] | None = None
    on_status: Callable[[ServerResult], None] | None = None
    on_deploy_failed: Callable[[str, int, str], None] | None = None
    on_variable: Callable[[str, str, Any], None] | None = None  # API mode: (server, name, value), live


@dataclass
class Execution:
    """State of one execution while it runs (on the loop)."""

    execution_id: str
    event: Event
    payload: PreparedPayload
    input: Any
    callbacks: Callbacks
    store: StoreWorker
    api: bool
    variable_scope: str  # the executor's when the execution started
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    results: dict[str, ServerResult] = field(default_factory=dict)
    seq: Counter[str] = field(default_factory=Counter)
    stored_bytes: int = 0  # of log text, all servers together
    dropped: dict[str, list[int]] = field(default_factory=dict)  # server -> [lines, bytes] not stored

    def __post_init__(self) -> None:
        self.callbacks = _guarded(self.callbacks)
        self.redactor = Redactor(self.event.secrets.values())
        self._in_flight: deque[tuple[concurrent.futures.Future[None], int]] = deque()
        self._bytes_in_flight = 0
        self.log = LogBuffer(self.store.store, write=self._write_logs)
        self._variables_read: asyncio.Future[dict[str, Any]] | None = None

    async def starting_variables(self) -> dict[str, Any]:
        """The scope's variables as stored now, for a server's run to start with. Servers that
        ask while a read is under way share it (a read per server, queued on the store's thread,
        delayed a large fan-out); once a variable is stored (:meth:`variable_stored`), or the read
        is done, the next server reads again."""
        if self._variables_read is None or self._variables_read.done():
            self._variables_read = self.store.queued(self.store.store.get_variables, self.variable_scope)
        return dict(await asyncio.shield(self._variables_read))

    def variable_stored(self) -> None:
        """A variable was queued for the store: a read under way may not have it."""
        self._variables_read = None

    def _write_logs(self, chunks: Sequence[LogChunk]) -> None:
        size = sum(len(chunk.lines) for chunk in chunks)
        self._in_flight.append((self.store.submit(self.store.store.append_log_chunks, chunks), size))
        self._bytes_in_flight += size

    async def room_for_output(self) -> None:
        """Wait while more than ``MAX_LOG_BYTES_IN_FLIGHT`` of log text waits for the store."""
        while self._in_flight and (self._in_flight[0][0].done() or self._bytes_in_flight > MAX_LOG_BYTES_IN_FLIGHT):
            written, size = self._in_flight.popleft()
            if not written.done():
                await asyncio.wait([asyncio.wrap_future(written)])  # a failed write: the worker logs it
            self._bytes_in_flight -= size

    async def run(
        self,
        targets: list[Server],
        run_server: Callable[[Server, asyncio.Semaphore], Awaitable[ServerResult]],
        *,
        concurrency: int,
        keep_going: bool,
        cancelled: bool = False,
        rollout: Rollout | None = None,
    ) -> ExecutionResult:
        """Run ``run_server(server, limit)`` for every target: a coroutine that works on the
        server while holding ``limit`` and always returns its result (cancelled too). Cancelled
        (now, or before it began: ``cancelled``), stop every server and give back the cancelled
        result; a server that never started is recorded as cancelled too. With a ``rollout``,
        the targets go batch by batch, and once more than its ``max_fail`` did not succeed the
        batches not started are marked skipped (see :mod:`cronium_nb.rollout`)."""
        for server in targets:
            self.results[server.name] = ServerResult(server.name)
        rollout = rollout or Rollout()
        limit = asyncio.Semaphore(concurrency)
        flusher = asyncio.ensure_future(self._flush_logs())
        batches = [] if cancelled else rollout.batches(targets)
        tasks: list[asyncio.Task[ServerResult]] = []
        try:
            not_succeeded = 0
            for number, batch in enumerate(batches, 1):
                batch_tasks = [asyncio.ensure_future(run_server(server, limit)) for server in batch]
                tasks += batch_tasks
                pending = set(batch_tasks)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    failed = any(task.result().status != Status.SUCCESS for task in done)
                    if failed and not keep_going and pending:
                        for task in pending:
                            task.cancel()
                not_succeeded += sum(task.result().status != Status.SUCCESS for task in batch_tasks)
                if not_succeeded and not keep_going:
                    break  # the servers not started are recorded as cancelled, below
                if number < len(batches) and rollout.should_stop(not_succeeded, len(targets)):
                    reason = rollout.skip_reason(not_succeeded, len(targets), number, len(batches))
                    for later in batches[number:]:
                        for server in later:
                            self._skip(self.results[server.name], reason)
                    break
        except asyncio.CancelledError:
            cancelled = True
            uncancel()
            for task in tasks:
                task.cancel()
            if tasks:
                await uninterrupted(asyncio.wait(tasks))  # a second cancel must not cut this short
        finally:
            flusher.cancel()
            self.log.flush()
        store = self.store.store
        for result in self.results.values():
            if result.status == Status.PENDING:
                result.status, result.error_kind = Status.CANCELLED, "cancelled"
                result.error = "cancelled before it began"
                fields = {"status": result.status, "error": result.error, "error_kind": result.error_kind}
                self.store.submit(store.update_server, self.execution_id, result.server, **fields)
        status = overall_status(list(self.results.values()), cancelled=cancelled)
        # Waited for (after every write queued before it): the result handed back is the one
        # stored, and a store that cannot take it is an error, not a log line.
        await uninterrupted(self.store.call(store.finish_execution, self.execution_id, status))
        return ExecutionResult(self.execution_id, self.event.name, status, self.results, store)

    def _skip(self, result: ServerResult, reason: str) -> None:
        """A server the rollout stopped before: nothing was started on it."""
        result.status, result.error, result.error_kind = Status.SKIPPED, reason, None
        fields = {"status": result.status, "error": result.error}
        self.store.submit(self.store.store.update_server, self.execution_id, result.server, **fields)
        self.status(result)

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL_S)
            self.log.flush()

    # -- called by the server runs

    def lines(self, server: str, stream: str, text: str, count: int, ts: float) -> None:
        """``count`` lines of one stream, joined by newlines (secrets already redacted, as they
        streamed: see RemoteRun). From the first line that would pass the execution's
        ``max_log_bytes`` on, they are counted, not stored (see :meth:`truncation_marker`), so
        what is stored is a prefix of the output; they are still shown live."""
        first_seq = self.seq[server] + 1
        self.seq[server] += count
        room = self.max_log_bytes - self.stored_bytes
        if not self.dropped and len(text) <= room:
            stored, stored_count = text, count
        elif not self.dropped and (end := text.rfind("\n", 0, room + 1)) >= 0:
            # the lines that still fit (one chunk can hold a whole burst of output), then no more
            stored = text[:end]
            stored_count = stored.count("\n") + 1
        else:
            stored, stored_count = "", 0
        if stored_count:
            self.stored_bytes += len(stored)
            self.log.add_chunk(LogChunk(self.execution_id, server, first_seq, stored_count, ts, stream, stored))
        if stored_count < count:
            dropped = self.dropped.setdefault(server, [0, 0])
            dropped[0] += count - stored_count
            dropped[1] += len(text) - len(stored) - (1 if stored_count else 0)  # and the newline between
        if self.callbacks.on_line is not None:
            for line in text.split("\n"):
                self.callbacks.on_line(server, stream, line, ts)

    def truncation_marker(self, server: str) -> None:
        """Once a server is done: a last line saying how much of its output was not stored."""
        if server in self.dropped:
            lines, size = self.dropped[server]
            self.seq[server] += 1
            text = (
                f"[cronium] output truncated: {lines} lines ({size / 2**20:.1f} MiB) not stored, over this "
                f"execution's limit of {self.max_log_bytes / 2**20:.0f} MiB of stored output (max_log_bytes)"
            )
            self.log.add_chunk(LogChunk(self.execution_id, server, self.seq[server], 1, time.time(), "cronium", text))

    def status(self, result: ServerResult, phase: str | None = None) -> None:
        result.phase = phase
        if self.callbacks.on_status is not None:
            self.callbacks.on_status(result)


def _guarded(callbacks: Callbacks) -> Callbacks:
    """``callbacks`` with each one's exceptions logged, not raised: a bug in a widget or a
    notebook's callback must not stop a server's run, nor leave the execution unrecorded."""

    def guard(name: str, callback: Callable[..., None] | None) -> Callable[..., None] | None:
        if callback is None:
            return None

        @functools.wraps(callback)
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                log.exception("the %s callback raised (the run goes on)", name)

        return guarded

    return Callbacks(**{f.name: guard(f.name, getattr(callbacks, f.name)) for f in dataclasses.fields(Callbacks)})
