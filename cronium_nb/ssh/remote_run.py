"""Runs on a server: a long-lived runner session per connection, and one run on it.

A :class:`RunnerSession` is one runner session on one SSH channel: a forked child of the runner
daemon reached through the daemon's Unix socket (a stream-local channel: no process start on the
server), or a ``cronium-runner serve`` process on an exec channel where there is no daemon. Its
input carries run requests (a JSON line, then the payload) and control lines; its output carries
the runner's frames (:mod:`cronium_nb.protocol`), read in 64 KiB chunks and split into lines
here. A session runs one payload at a time and stays for the next.

A :class:`RemoteRun` is one run on a session. A timeout or a cancel asks the runner to stop (it
signals the script's whole process tree: SIGTERM, grace, SIGKILL); if the runner does not answer
within the grace period plus a margin, the session's channel is aborted, which ends the runner
too (its input ends) and the session with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from cronium_nb.errors import RunnerUnavailable
from cronium_nb.protocol import MESSAGE, STREAM_NAMES, Frame, FrameDecoder, LineSplitter, ProtocolError, coalesced
from cronium_nb.redaction import Redactor

READ_SIZE = 65536
STOP_MARGIN_S = 5.0
# A runner session says hello within milliseconds (about a second under emulation); one that
# stays silent (a daemon that accepted into its backlog and then stalled or left) is given up,
# and the caller falls back to a runner process of its own, instead of waiting out the timeout.
HELLO_TIMEOUT_S = 30.0
MAX_LINE = 1024 * 1024
# The lines handler gets (stream, text, count, ts): ``count`` lines read together, joined by
# newlines (one call per chunk, not per line); lines longer than MAX_LINE arrive in pieces.
T = TypeVar("T")
LinesHandler = Callable[[str, str, int, float], None]


@dataclass
class RunOutcome:
    result: dict[str, Any] | None  # the runner's result message; None when it never came
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)


class RunnerSession:
    """One runner session; open it with :meth:`start` (a ``serve`` process on an exec channel) or
    :meth:`connect` (the runner daemon's Unix socket), then one :class:`RemoteRun` at a time."""

    def __init__(
        self,
        writer: asyncssh.SSHWriter,
        reader: asyncssh.SSHReader,
        stderr: asyncssh.SSHReader | None,
        build_name: str,
        process: asyncssh.SSHClientProcess[Any] | None = None,
    ) -> None:
        self._writer, self._reader_stream, self._stderr_stream = writer, reader, stderr
        self.channel = writer.channel
        # The ``serve`` process on an exec channel; None for a daemon session, whose stream-local
        # channel has no exit status.
        self._process = process
        self.build_name = build_name
        self.hello: dict[str, Any] | None = None
        self.error: str | None = None
        self._decoder = FrameDecoder()
        self._hello_seen = asyncio.Event()
        self._ended = asyncio.Event()
        self._run: RemoteRun | None = None
        self._stderr = bytearray()
        self._reader = asyncio.ensure_future(self._read())
        self._stderr_reader = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(cls, connection: asyncssh.SSHClientConnection, command: str, build_name: str) -> RunnerSession:
        """Start ``cronium-runner serve``; :class:`RunnerUnavailable` when it does not say hello."""
        process = await connection.create_process(command, encoding=None)
        return await cls(process.stdin, process.stdout, process.stderr, build_name, process)._greeted()

    @classmethod
    async def connect(
        cls, connection: asyncssh.SSHClientConnection, socket_path: str, build_name: str
    ) -> RunnerSession:
        """A session of the runner daemon at ``socket_path`` (raises asyncssh.ChannelOpenError
        when no daemon listens there, or the server allows no stream-local forwarding)."""
        reader, writer = await connection.open_unix_connection(socket_path)
        return await cls(writer, reader, None, build_name)._greeted()

    async def _greeted(self) -> RunnerSession:
        try:
            await asyncio.wait_for(self._hello_seen.wait(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.close()
            raise RunnerUnavailable(f"no hello from the runner within {HELLO_TIMEOUT_S:g} s") from None
        except asyncio.CancelledError:
            self.close()
            raise
        if self.hello is None:
            await asyncio.wait([self._stderr_reader], timeout=1.0)
            detail = self._stderr.decode(errors="replace").strip()[-500:] or self.error or "no output"
            self.close()
            if self._process is None:
                raise RunnerUnavailable(f"the runner daemon's session ended before its hello: {detail}")
            raise RunnerUnavailable(f"runner did not start (exit {self._process.exit_status}): {detail}")
        return self

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def send(self, data: bytes) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):  # a lost channel is the reader's news
            self._writer.write(data)

    def attach(self, run: RemoteRun | None) -> None:
        self._run = run

    def abort(self) -> None:
        self.channel.abort()

    def close(self) -> None:
        """End the session: the runner sees its stdin end and exits."""
        self.channel.close()

    async def aclose(self, timeout: float = 5.0) -> None:
        """End the session and wait until the server has released it (sessions count toward
        sshd's MaxSessions): the runner sees its stdin end and exits, and sshd closes the
        channel after that. Closing the channel from here instead would let sshd keep the
        session until the runner has gone, a little later: too late for the next channel."""
        with contextlib.suppress(asyncssh.Error, OSError):
            self._writer.write_eof()
        try:
            await asyncio.wait_for(self.channel.wait_closed(), timeout)
        except (asyncio.TimeoutError, asyncssh.Error, OSError):
            self.close()

    async def _read(self) -> None:
        try:
            while data := await self._reader_stream.read(READ_SIZE):
                for frame in coalesced(self._decoder.feed(data)):
                    self._dispatch(frame)
                if self._run is not None and self._run.room is not None:
                    await self._run.room()  # the runner waits meanwhile (SSH flow control)
        except ProtocolError as error:
            self.error = f"corrupt runner output: {error}"
            self.abort()
        except (asyncssh.Error, OSError) as error:
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            self.error = f"connection lost during the run: {reason}"
        finally:
            self._ended.set()
            self._hello_seen.set()
            if self._run is not None:
                self._run.session_ended()

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind == MESSAGE:
            message = frame.message()
            if message.get("type") == "hello":
                self.hello = message
                self._hello_seen.set()
            elif self._run is not None:
                self._run.message(message)
        elif self._run is not None:
            self._run.stream(frame)

    async def _drain_stderr(self) -> None:
        """Keep the last 4 KiB of the channel's stderr (a shell's "not found", a crash)."""
        if self._stderr_stream is None:
            return
        with contextlib.suppress(asyncssh.Error, OSError):
            while data := await self._stderr_stream.read(READ_SIZE):
                self._stderr += data[-4096:]
                del self._stderr[:-4096]


class RemoteRun:
    """One payload run on a :class:`RunnerSession`."""

    def __init__(
        self,
        session: RunnerSession,
        context: dict[str, Any],
        payload: bytes,
        sha256: str,
        *,
        timeout: float,
        grace: float,
        on_lines: LinesHandler,
        redactor: Redactor | None = None,
        room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.session = session
        self.room = room  # awaited after each chunk read: where the lines go may be full
        self.request = {**context, "op": "run", "sha256": sha256, "payload_size": len(payload)}
        self.payload = payload
        self.timeout, self.grace = timeout, grace
        self.on_lines = on_lines
        redact, hold_back = (redactor.data, redactor.longest) if redactor else (None, 0)
        self._splitters = {kind: LineSplitter(MAX_LINE, redact, hold_back) for kind in STREAM_NAMES}
        self._outcome = RunOutcome(result=None)
        self._done = asyncio.get_running_loop().create_future()
        self._stale: str | None = None
        self._started_at: float | None = None
        self._result_at: float | None = None

    @property
    def reusable(self) -> bool:
        """The session came through this run intact and can take the next one."""
        return self.session.alive and self._outcome.result is not None and self._outcome.error is None

    async def run(self) -> RunOutcome:
        begin = time.monotonic()
        self.session.attach(self)
        try:
            if not self.session.alive:
                self.session_ended()
            self.session.send(json.dumps(self.request).encode() + b"\n" + self.payload)
            try:
                await asyncio.wait_for(asyncio.shield(self._done), self.timeout + STOP_MARGIN_S)
            except asyncio.TimeoutError:
                # The runner enforces the timeout itself; we get here only if it did not report.
                self._outcome.timed_out = True
                await self._stop("timeout")
            except asyncio.CancelledError:
                self._outcome.cancelled = True
                uncancel()
                await self._stop("cancel")
        finally:
            self.session.attach(None)
        if self._stale is not None:
            raise RunnerUnavailable(self._stale)
        for kind, splitter in self._splitters.items():
            rest = splitter.flush()
            self._emit(kind, b"\n".join(rest), len(rest), time.time())
        if self._outcome.result is None and self._outcome.error is None and not self._outcome.cancelled:
            self._outcome.error = self.session.error
        end = time.monotonic()
        started = self._started_at or end
        reported = self._result_at or end
        # upload: request and payload sent, verified, extracted; run: the script; cleanup: work
        # dir removed, result back.
        self._outcome.phases = {"upload": started - begin, "run": reported - started, "cleanup": end - reported}
        return self._outcome

    async def _stop(self, reason: str) -> None:
        self.session.send(json.dumps({"op": "stop", "reason": reason}).encode() + b"\n")
        try:
            await asyncio.wait_for(asyncio.shield(self._done), self.grace + STOP_MARGIN_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._outcome.error = f"the server did not confirm the stop within {self.grace + STOP_MARGIN_S:.0f} s"
            self.session.abort()

    # -- called by the session's reader

    def message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "started":
            self._started_at = time.monotonic()
        elif kind == "result":
            self._outcome.result = message
            self._result_at = time.monotonic()
            self._finish()
        elif kind == "stale":
            self._stale = f"runner out of date on the server: {message.get('reason')}"
            self._finish()

    def stream(self, frame: Frame) -> None:
        self._emit(frame.kind, *self._splitters[frame.kind].feed_block(frame.payload), frame.ts)

    def session_ended(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _emit(self, kind: bytes, block: bytes, count: int, ts: float) -> None:
        """``count`` lines joined by newlines, to the lines handler (nothing when there are none)."""
        if count:
            self.on_lines(STREAM_NAMES[kind], block.decode("utf-8", errors="backslashreplace"), count, ts)


def uncancel() -> None:
    """Let a task that caught its cancellation go on cleaning up (Python >= 3.11 counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


async def uninterrupted(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even when the caller is cancelled meanwhile (cleanup that
    must finish: stopping the servers, storing the result); such cancellations are absorbed."""
    future = asyncio.ensure_future(awaitable)
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            uncancel()
