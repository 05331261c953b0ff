"""One run of the runner on one server, over one SSH channel.

The channel's stdin carries the run context, then the payload, then control lines; its stdout
carries the runner's frames (:mod:`cronium_runner.protocol`), read in 64 KiB chunks and split
into lines here. A timeout or a cancel asks the runner to stop (it signals the script's whole
process tree: SIGTERM, grace, SIGKILL); if the runner does not answer within the grace period
plus a margin, the channel is closed, which ends the runner too (its stdin ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from cronium_runner.protocol import MESSAGE, STREAM_NAMES, FrameDecoder, LineSplitter, ProtocolError

READ_SIZE = 65536
STOP_MARGIN_S = 5.0
MAX_LINE = 1024 * 1024
# The lines handler gets (stream, text, count, ts): ``count`` lines read together, joined by
# newlines (one call per chunk, not per line); lines longer than MAX_LINE arrive in pieces.
LinesHandler = Callable[[str, str, int, float], None]


class RunnerUnavailable(Exception):
    """The runner did not start (missing, corrupt): deploy again and retry."""


@dataclass
class RunOutcome:
    result: dict[str, Any] | None  # the runner's result message; None when it never came
    exit_status: int | None
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None
    hello: dict[str, Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)


class RemoteRun:
    def __init__(
        self,
        connection: asyncssh.SSHClientConnection,
        command: str,
        context: dict[str, Any],
        payload: bytes,
        *,
        timeout: float,
        grace: float,
        on_lines: LinesHandler,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.connection, self.command = connection, command
        self.context, self.payload = context, payload
        self.timeout, self.grace = timeout, grace
        self.on_lines, self.on_message = on_lines, on_message
        self._decoder = FrameDecoder()
        self._splitters = {kind: LineSplitter(MAX_LINE) for kind in STREAM_NAMES}
        self._outcome = RunOutcome(result=None, exit_status=None)
        self._started_at: float | None = None
        self._result_at: float | None = None
        self._stderr = bytearray()

    async def run(self) -> RunOutcome:
        begin = time.monotonic()
        process = await self.connection.create_process(self.command, encoding=None)
        try:
            # A runner that is missing or broken exits before reading: the write then fails, and
            # the missing hello below says what happened.
            with contextlib.suppress(asyncssh.Error, OSError):
                process.stdin.write(json.dumps({**self.context, "payload_size": len(self.payload)}).encode() + b"\n")
                process.stdin.write(self.payload)
            stderr_task = asyncio.ensure_future(self._drain_stderr(process))
            reader = asyncio.ensure_future(self._read(process))
            try:
                await asyncio.wait_for(asyncio.shield(reader), self.timeout + STOP_MARGIN_S)
            except asyncio.TimeoutError:
                # The runner enforces the timeout itself; we get here only if it did not report.
                self._outcome.timed_out = True
                await self._stop(process, reader, "timeout")
            except asyncio.CancelledError:
                self._outcome.cancelled = True
                uncancel()
                await self._stop(process, reader, "cancel")
            await asyncio.wait([stderr_task], timeout=1.0)
            stderr_task.cancel()
        finally:
            process.close()
        completed = process.exit_status
        self._outcome.exit_status = completed
        if self._outcome.hello is None and self._outcome.result is None and not self._outcome.cancelled:
            detail = self._stderr.decode(errors="replace").strip()[-500:]
            raise RunnerUnavailable(f"runner did not start (exit {completed}): {detail or 'no output'}")
        end = time.monotonic()
        started = self._started_at or end
        reported = self._result_at or end
        # upload: payload sent, verified, extracted; run: the script; cleanup: work dir removed,
        # channel closed.
        self._outcome.phases = {"upload": started - begin, "run": reported - started, "cleanup": end - reported}
        return self._outcome

    async def _stop(self, process: asyncssh.SSHClientProcess, reader: asyncio.Future, reason: str) -> None:
        with contextlib.suppress(Exception):
            process.stdin.write(json.dumps({"op": "stop", "reason": reason}).encode() + b"\n")
        try:
            await asyncio.wait_for(asyncio.shield(reader), self.grace + STOP_MARGIN_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._outcome.error = f"the server did not confirm the stop within {self.grace + STOP_MARGIN_S:.0f} s"
            reader.cancel()
            process.channel.abort()

    async def _drain_stderr(self, process: asyncssh.SSHClientProcess) -> None:
        """Keep the last 4 KiB of the channel's stderr (a shell's "not found", a crash)."""
        with contextlib.suppress(asyncssh.Error, OSError):  # a lost connection is the reader's news
            while data := await process.stderr.read(READ_SIZE):
                self._stderr += data[-4096:]
                del self._stderr[:-4096]

    async def _read(self, process: asyncssh.SSHClientProcess) -> None:
        try:
            while data := await process.stdout.read(READ_SIZE):
                self._feed(data)
        except ProtocolError as error:
            self._outcome.error = f"corrupt runner output: {error}"
            if self._outcome.hello is None:
                return
        for kind, splitter in self._splitters.items():
            self._emit(kind, splitter.flush(), time.time())
        await process.wait_closed()

    def _feed(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if frame.kind == MESSAGE:
                message = frame.message()
                kind = message.get("type")
                if kind == "hello":
                    self._outcome.hello = message
                elif kind == "started":
                    self._started_at = time.monotonic()
                elif kind == "result":
                    self._outcome.result = message
                    self._result_at = time.monotonic()
                if self.on_message is not None:
                    self.on_message(message)
                continue
            self._emit(frame.kind, self._splitters[frame.kind].feed(frame.payload), frame.ts)

    def _emit(self, kind: bytes, lines: list[bytes], ts: float) -> None:
        if lines:
            text = b"\n".join(lines).decode("utf-8", errors="backslashreplace")
            self.on_lines(STREAM_NAMES[kind], text, len(lines), ts)


def uncancel() -> None:
    """Let a task that caught its cancellation go on cleaning up (Python >= 3.11 counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
