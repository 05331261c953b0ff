"""Driving the runner in tests: build payloads, run them locally or over SSH, decode the frames."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import pytest

import cronium_nb
from cronium_nb.fleet import HOST_ARCH
from cronium_nb.manifest import SCRIPT_TYPES, Manifest
from cronium_nb.model import Server
from cronium_nb.payload import PayloadArchive, build_archive
from cronium_nb.protocol import MESSAGE, STREAM_NAMES, FrameDecoder, LineSplitter
from tests.conftest import REPO_ROOT

# The runner binary for this machine (`make runner`); CRONIUM_TEST_RUNNER overrides it.
LOCAL_RUNNER = shlex.split(os.environ.get("CRONIUM_TEST_RUNNER", "")) or [
    str(REPO_ROOT / "runner" / "dist" / f"cronium-runner-linux-{HOST_ARCH}")
]


def make_payload(
    script: str | bytes, type: str = "bash", extra_files: dict[str, bytes] | None = None, **fields: Any
) -> PayloadArchive:
    entrypoint = fields.pop("entrypoint", "script" + SCRIPT_TYPES[type][0])
    manifest = Manifest(name=fields.pop("name", "test-event"), type=type, entrypoint=entrypoint, **fields)
    return build_archive(manifest, script, extra_files)


@dataclass
class RunReport:
    """Everything a framed run sent back."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    lines: list[tuple[str, bytes]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    exit_status: int | None = None

    @property
    def result(self) -> dict[str, Any]:
        results = [m for m in self.messages if m.get("type") == "result"]
        assert len(results) == 1, f"expected one result message, got {self.messages}"
        return results[0]

    def message(self, kind: str) -> dict[str, Any]:
        return next(m for m in self.messages if m.get("type") == kind)

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class ReportBuilder:
    """Feeds raw runner stdout into a RunReport, frame by frame."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.report = RunReport()
        self._decoder = FrameDecoder()
        self._splitters = {kind: LineSplitter(max_line=8 * 1024 * 1024) for kind in STREAM_NAMES}
        self._on_message = on_message

    def feed(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if frame.kind == MESSAGE:
                message = frame.message()
                self.report.messages.append(message)
                if self._on_message:
                    self._on_message(message)
                continue
            (self.report.stdout if frame.kind == b"O" else self.report.stderr).extend(frame.payload)
            for line in self._splitters[frame.kind].feed(frame.payload):
                self.report.lines.append((STREAM_NAMES[frame.kind], line))

    def finish(self, exit_status: int | None) -> RunReport:
        assert self._decoder.pending == 0, "stream ended inside a frame"
        for kind, splitter in self._splitters.items():
            self.report.lines.extend((STREAM_NAMES[kind], line) for line in splitter.flush())
        self.report.exit_status = exit_status
        return self.report


def context_line(archive: PayloadArchive | None, context: dict[str, Any] | None) -> bytes:
    data = dict(context or {})
    if archive is not None:
        data["payload_size"] = archive.size
    return json.dumps(data).encode() + b"\n"


class LocalRun:
    """A framed runner process on this machine, payload on stdin."""

    def __init__(
        self,
        archive: PayloadArchive,
        *,
        context: dict[str, Any] | None = None,
        sha256: str | None = "auto",
        workroot: str,
        extra_args: tuple[str, ...] = (),
        runner: list[str] = LOCAL_RUNNER,
    ) -> None:
        sha = archive.sha256 if sha256 == "auto" else sha256
        argv = [*runner, "run", "-", "--framed", "--workroot", workroot, *extra_args]
        if sha:
            argv += ["--sha256", sha]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.builder = ReportBuilder()
        self.process.stdin.write(context_line(archive, context) + archive.data)
        self.process.stdin.flush()

    def read_until(self, predicate: Callable[[RunReport], bool]) -> RunReport:
        """Read frames until ``predicate`` holds (or the stream ends)."""
        while not predicate(self.builder.report):
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                break
            self.builder.feed(data)
        return self.builder.report

    def send(self, message: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def close_stdin(self) -> None:
        self.process.stdin.close()

    def finish(self, timeout: float = 120) -> RunReport:
        self.read_until(lambda _report: False)
        if not self.process.stdin.closed:
            self.process.stdin.close()
        return self.builder.finish(self.process.wait(timeout))


def grandchildren_script(base: int) -> str:
    """A script that leaves three sleepers behind (a child, a grandchild, a setsid escapee),
    printing their pids; the sleep times ``base + 1..3`` make them easy to find in ``ps``."""
    return (
        f'sleep {base + 1} & echo "pid $!"\n'
        f'( sleep {base + 2} & echo "pid $!" ; wait ) &\n'
        f"setsid sh -c 'sleep {base + 3} & echo \"pid $!\"; wait' &\n"
        "echo ready\nwait\n"
    )


def processes_matching(fleet: Any, name: str, pattern: str) -> list[str]:
    """Lines of ``ps`` on a fleet server that match ``pattern`` (``ps`` itself excluded)."""
    output = fleet.exec(name, "ps -eo pid,stat,args").output
    return [line for line in output.splitlines() if re.search(pattern, line) and "ps -eo" not in line]


# A daemon's sessions are the binary started again with `daemon ... --session`: a job's, not the daemon.
RUNNER_PROCESS = re.compile(r"cronium-runner (run|serve)\b|cronium-runner daemon\b.* --session\b")
RUNNER_DAEMON = re.compile(r"cronium-runner daemon\b(?!.* --session\b)")


def _process_rows(fleet: Any, name: str) -> list[list[str]]:
    """``[pid, ppid, stat, args]`` of every process on a fleet server (``ps`` itself excluded)."""
    output = fleet.exec(name, "ps -eo pid,ppid,stat,args").output
    return [line.split(None, 3) for line in output.splitlines()[1:] if "ps -eo" not in line]


def runner_daemons(fleet: Any, name: str) -> list[str]:
    """Pids of the runner daemons on a fleet server (not of their sessions: the daemon's
    children, started as ``daemon ... --session``)."""
    rows = _process_rows(fleet, name)
    daemons = {row[0] for row in rows if RUNNER_DAEMON.search(row[3])}
    return [row[0] for row in rows if row[0] in daemons and row[1] not in daemons]


def leftover_processes(fleet: Any, name: str, pattern: str) -> list[str]:
    """Processes of a job still on a fleet server: those matching ``pattern``, runner processes,
    and sessions of the runner daemon (its children). The idle daemon itself belongs to no job
    and is not listed."""
    rows = _process_rows(fleet, name)
    daemons = {row[0] for row in rows if RUNNER_DAEMON.search(row[3])}
    return [
        " ".join(row)
        for row in rows
        if re.search(pattern, row[3]) or RUNNER_PROCESS.search(row[3]) or (row[0] in daemons and row[1] in daemons)
    ]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll a condition (a bounded wait; the test fails if it never holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# How long a fleet test polls for a condition: emulated arm64 under a shared machine's load; a
# bound for a hang, not a timing.
POLL_LIMIT_S = 120.0


def wait_until(what: str, condition: Callable[[], bool], limit: float = POLL_LIMIT_S, job: Any = None) -> None:
    """Poll ``condition`` (bounded: a hang is the failure, saying ``what`` did not happen); a
    ``job`` (a :class:`cronium_nb.Job`) that ends meanwhile fails it with its summary."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"not within {limit:g} s: {what}"
        if job is not None and job.done():
            pytest.fail(f"the run ended before {what}: {job.result().summary.to_dict('records')}")
        time.sleep(0.2)


def submit_and_wait_for_output(executor: Any, event: Any) -> Any:
    """Start a job and return once its script has printed something (so it is surely running)."""
    running = threading.Event()
    job = executor.submit(event, callbacks=cronium_nb.Callbacks(on_line=lambda *_: running.set()))
    assert running.wait(60), "the script never printed"
    return job


def has_result(report: RunReport) -> bool:
    return any(m.get("type") == "result" for m in report.messages)


def run_local(archive: PayloadArchive, **kwargs: Any) -> RunReport:
    run = LocalRun(archive, **kwargs)
    run.read_until(has_result)
    return run.finish()


# --- over SSH ---------------------------------------------------------------------------------


async def connect(server: Server, *, connect_timeout: float = 60) -> asyncssh.SSHClientConnection:
    """A strict-host-key connection to a fleet server (tests only; the executor has its pool).
    A port or user left as None is asyncssh's default (22, the local user), as for the executor."""
    defaults = {"port": server.port, "username": server.user}
    return await asyncssh.connect(
        server.host,
        client_keys=[server.key_path],
        known_hosts=server.known_hosts,
        connect_timeout=connect_timeout,
        **{name: value for name, value in defaults.items() if value is not None},
    )


class SshRun:
    """A framed runner process on a server, payload on the SSH channel's stdin."""

    def __init__(self, process: asyncssh.SSHClientProcess) -> None:
        self.process = process
        self.builder = ReportBuilder()

    @classmethod
    async def start(
        cls,
        connection: asyncssh.SSHClientConnection,
        runner: list[str],
        archive: PayloadArchive,
        *,
        context: dict[str, Any] | None = None,
        sha256: str | None = "auto",
    ) -> SshRun:
        sha = archive.sha256 if sha256 == "auto" else sha256
        argv = [*runner, "run", "-", "--framed", *(["--sha256", sha] if sha else [])]
        process = await connection.create_process(shlex.join(argv), encoding=None)
        process.stdin.write(context_line(archive, context) + archive.data)
        return cls(process)

    async def read_until(self, predicate: Callable[[RunReport], bool]) -> RunReport:
        while not predicate(self.builder.report):
            data = await self.process.stdout.read(65536)
            if not data:
                break
            self.builder.feed(data)
        return self.builder.report

    async def finish(self) -> RunReport:
        await self.read_until(has_result)
        self.process.stdin.write_eof()
        await self.read_until(lambda _report: False)
        completed = await self.process.wait()
        return self.builder.finish(completed.exit_status)


async def run_over_ssh(server: Server, runner: list[str], archive: PayloadArchive, **kwargs: Any) -> RunReport:
    async with await connect(server) as connection:
        run = await SshRun.start(connection, runner, archive, **kwargs)
        return await run.finish()
