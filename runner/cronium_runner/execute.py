"""Running one payload: prepare the work dir, supervise the script, report, clean up.

The script runs in its own session (process group). The runner makes itself a child
subreaper, so that whatever the script starts stays in the runner's process tree even after a
double fork or ``setsid``; when the script ends, or the run is stopped, that whole tree is
signalled: first the stop signal, then SIGKILL after the grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cronium_runner import __version__, helpers, payload, protocol
from cronium_runner.exitcodes import RunnerError, RunnerExit
from cronium_runner.manifest import Manifest, ManifestError, validate_env
from cronium_runner.resources.cronium import (
    API_SOCKET_VARIABLE,
    API_TOKEN_FILE_VARIABLE,
    OUTPUT_FILE,
    VARIABLES_FILE,
)

READ_SIZE = 65536
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PIPE_DRAIN_S = 2.0  # how long to read pipes that outlive every process of the run
PR_SET_CHILD_SUBREAPER = 36
KILL_REPEAT_S = 0.2
API_TOKEN_FILE = ".api-token"  # in the work dir, mode 0600
RUN_MARK_VARIABLE = "CRONIUM_RUN_MARK"  # in every process of a run's environment; see run_processes


class OrchestratorGone(Exception):
    """Writing to the orchestrator failed: the connection is gone."""


# --- reporting --------------------------------------------------------------------------------


class Reporter:
    """Where script output and runner messages go."""

    def stream(self, kind: bytes, ts: float, data: bytes) -> None:
        raise NotImplementedError

    def message(self, message: dict[str, Any]) -> None:
        raise NotImplementedError


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError as error:
            raise OrchestratorGone from error
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError as error:
            raise OrchestratorGone from error
        view = view[written:]


class FramedReporter(Reporter):
    """The protocol of :mod:`cronium_runner.protocol` on stdout, for the orchestrator."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.gone = False
        # Sent with the first frame: one write, not two small ones (sshd may still have Nagle's
        # algorithm on, and a second small write then waits for a delayed ACK, 40 ms).
        self._pending = protocol.MAGIC

    def _send(self, frame: bytes) -> None:
        if self.gone:
            return
        if self._pending:
            frame, self._pending = self._pending + frame, b""
        try:
            _write_all(self.fd, frame)
        except OrchestratorGone:
            self.gone = True
            raise

    def stream(self, kind: bytes, ts: float, data: bytes) -> None:
        self._send(protocol.encode(kind, ts, data))

    def message(self, message: dict[str, Any]) -> None:
        self._send(protocol.encode_message(time.time(), message))


class TextReporter(Reporter):
    """Local testing mode: script output passes straight through; the result goes to stderr."""

    def __init__(self, report_path: Path | None = None) -> None:
        self.report_path = report_path
        self.result: dict[str, Any] | None = None

    def stream(self, kind: bytes, ts: float, data: bytes) -> None:
        _write_all(1 if kind == protocol.STDOUT else 2, data)

    def message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "result":
            return
        self.result = message
        text = json.dumps(message, indent=1, sort_keys=True)
        if self.report_path:
            self.report_path.write_text(text + "\n")
        summary = {k: message.get(k) for k in ("exit_code", "timed_out", "stop_reason", "outputs", "variables")}
        if message.get("runner_error"):
            summary["runner_error"] = message["runner_error"]
        os.write(2, f"cronium-runner: {json.dumps(summary, sort_keys=True)}\n".encode())


# --- the run's context ------------------------------------------------------------------------

_UNSET = object()


@dataclass
class RunContext:
    """Per-run data that travels beside the payload (so the payload stays cacheable)."""

    execution_id: str = "local"
    server: str = "local"
    input: Any = _UNSET  # _UNSET: use the manifest's input
    variables: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # secret values: never in the manifest
    api: dict[str, str] | None = None  # API mode: {"socket": path of the forward, "token": ...}
    event: dict[str, Any] = field(default_factory=dict)  # what only the orchestrator knows: id, payload_version

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunContext:
        context = cls()
        context.execution_id = str(data.get("execution_id", context.execution_id))
        context.server = str(data.get("server", context.server))
        if "input" in data:
            context.input = data["input"]
        variables = data.get("variables") or {}
        if not isinstance(variables, dict):
            raise RunnerError(RunnerExit.USAGE, "run context 'variables' must be a mapping")
        context.variables = variables
        env = data.get("env") or {}
        try:
            validate_env(env)
        except ManifestError as error:
            raise RunnerError(RunnerExit.USAGE, f"run context: {error}") from None
        context.env = env
        api = data.get("api")
        if api is not None and not (
            isinstance(api, dict) and isinstance(api.get("socket"), str) and isinstance(api.get("token"), str)
        ):
            raise RunnerError(RunnerExit.USAGE, "run context 'api' needs a socket and a token")
        context.api = api
        event = data.get("event") or {}
        if not isinstance(event, dict):
            raise RunnerError(RunnerExit.USAGE, "run context 'event' must be a mapping")
        context.event = event
        return context


class ControlChannel:
    """Non-blocking reader of the orchestrator's JSON control lines on an fd (stdin)."""

    def __init__(self, fd: int, leftover: bytes = b"") -> None:
        self.fd = fd
        self._buffer = bytearray(leftover)
        self.ended = False
        os.set_blocking(fd, False)

    def leftover(self) -> bytes:
        """Bytes read but not yet handled (the start of the next request, in serve mode)."""
        return bytes(self._buffer)

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """Messages now available, and whether the channel has ended."""
        ended = False
        try:
            data = os.read(self.fd, READ_SIZE)
            ended = not data
            self._buffer += data
        except BlockingIOError:
            pass
        except OSError:
            ended = True
        self.ended = self.ended or ended
        messages = []
        while b"\n" in self._buffer:
            line, _, rest = bytes(self._buffer).partition(b"\n")
            self._buffer = bytearray(rest)
            try:
                messages.append(json.loads(line))
            except ValueError:
                messages.append({"op": "invalid", "line": line[:200].decode(errors="replace")})
        return messages, ended


# --- process tree -----------------------------------------------------------------------------


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group is still signalled


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) from /proc; empty where there is no /proc."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0].decode())
    return table


def _has_mark(pid: int, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            return mark in stream.read().split(b"\0")
    except OSError:
        return False


def run_processes(root: int, mark: bytes) -> dict[int, str]:
    """Processes of a run, pid -> state (zombies included): every descendant of ``root``, and
    every process whose environment carries ``mark``. The mark finds processes that escaped
    the tree (double fork plus ``setsid``) where the child-subreaper setting has no effect,
    e.g. under qemu-user emulation."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    pending = list(children.get(root, []))
    pending += [pid for pid in table if pid != root and pid not in found and _has_mark(pid, mark)]
    while pending:
        pid = pending.pop()
        if pid not in found and pid in table:
            found[pid] = table[pid][1]
            pending.extend(children.get(pid, []))
    return found


@dataclass
class Outcome:
    exit_code: int
    signal: int | None
    timed_out: bool
    stop_reason: str | None
    script_s: float


class Supervisor:
    """Runs the script, forwards its output, and makes sure none of its processes outlives it."""

    def __init__(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        timeout: float,
        grace: float,
        reporter: Reporter,
        control: ControlChannel | None,
    ) -> None:
        self.argv, self.cwd = argv, cwd
        mark = secrets.token_hex(8)
        self.env = {**env, RUN_MARK_VARIABLE: mark}
        self.mark = f"{RUN_MARK_VARIABLE}={mark}".encode()
        self.timeout, self.grace = timeout, grace
        self.reporter, self.control = reporter, control
        self.stop_reason: str | None = None
        self.timed_out = False
        self._kill_at: float | None = None
        self._pending_signals: list[int] = []
        self.process: subprocess.Popen | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending_signals.append(signum)

    def _signal_tree(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)
        for pid, state in run_processes(os.getpid(), self.mark).items():
            if state != "Z":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)

    def _reap_orphans(self) -> bool:
        """Reap zombie orphans; True while some process of the run other than the script is alive."""
        alive = False
        for pid, state in run_processes(os.getpid(), self.mark).items():
            if pid == self.process.pid:
                continue
            if state == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            else:
                alive = True
        return alive

    def stop(self, signum: int, reason: str) -> None:
        """Send ``signum`` to the whole tree now, SIGKILL after the grace period."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._signal_tree(signum)
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self.grace

    def run(self) -> Outcome:
        _become_subreaper()
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (*STOP_SIGNALS, signal.SIGCHLD)}
        selector = selectors.DefaultSelector()
        try:
            started = time.monotonic()
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self.reporter.message({"type": "started", "pid": self.process.pid})
            deadline = started + self.timeout
            streams = {self.process.stdout.fileno(): protocol.STDOUT, self.process.stderr.fileno(): protocol.STDERR}
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(wake_read, selectors.EVENT_READ)
            if self.control:
                selector.register(self.control.fd, selectors.EVENT_READ)
            exit_status: int | None = None
            orphans_signalled = False
            drain_since = 0.0
            while True:
                now = time.monotonic()
                timers = [deadline, now + 1.0]
                if self._kill_at is not None:
                    timers.append(self._kill_at)
                for key, _ in selector.select(max(0.0, min(timers) - now)):
                    fd = key.fd
                    if fd in streams:
                        data = os.read(fd, READ_SIZE)
                        if data:
                            self._report(streams[fd], data)
                        else:
                            selector.unregister(fd)
                            del streams[fd]
                    elif fd == wake_read:
                        while True:
                            try:
                                if not os.read(wake_read, 512):
                                    break
                            except BlockingIOError:
                                break
                    elif self.control and fd == self.control.fd:
                        self._handle_control(selector)
                while self._pending_signals:
                    signum = self._pending_signals.pop(0)
                    if signum != signal.SIGCHLD:
                        self.stop(signum, f"runner received {signal.Signals(signum).name}")
                now = time.monotonic()
                if exit_status is None and now >= deadline:
                    self.timed_out = True
                    self.stop(signal.SIGTERM, "timeout")
                if self._kill_at is not None and now >= self._kill_at:
                    self._signal_tree(signal.SIGKILL)
                    self._kill_at = now + KILL_REPEAT_S  # again, should anything have been born since
                if exit_status is None:
                    exit_status = self.process.poll()
                    if exit_status is not None:
                        script_s = time.monotonic() - started
                if exit_status is None:
                    continue
                if self._reap_orphans():
                    if not orphans_signalled:  # the script ended but left processes behind: they go too
                        orphans_signalled = True
                        self._signal_tree(signal.SIGTERM)
                        if self._kill_at is None:
                            self._kill_at = time.monotonic() + self.grace
                    continue
                if not streams:
                    break
                # Nothing of ours is alive, yet a pipe is open: some process outside our tree
                # holds it. Read what comes for a while, then stop waiting.
                drain_since = drain_since or now
                if now - drain_since > PIPE_DRAIN_S:
                    break
            code = exit_status if exit_status >= 0 else 128 - exit_status
            return Outcome(
                exit_code=code,
                signal=-exit_status if exit_status < 0 else None,
                timed_out=self.timed_out,
                stop_reason=self.stop_reason,
                script_s=script_s,
            )
        finally:
            selector.close()
            if self.process is not None:
                self.process.stdout.close()
                self.process.stderr.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_read)
            os.close(wake_write)

    def _report(self, kind: bytes, data: bytes) -> None:
        try:
            self.reporter.stream(kind, time.time(), data)
        except OrchestratorGone:
            self.stop(signal.SIGTERM, "orchestrator connection lost")

    def _handle_control(self, selector: selectors.BaseSelector) -> None:
        assert self.control is not None
        messages, ended = self.control.read()
        for message in messages:
            if message.get("op") == "stop":
                reason = str(message.get("reason", "stop requested"))
                self.timed_out = self.timed_out or reason == "timeout"
                self.stop(signal.SIGTERM, reason)
        if ended:
            selector.unregister(self.control.fd)
            self.control = None
            self.stop(signal.SIGTERM, "orchestrator connection lost")


# --- one run, end to end ----------------------------------------------------------------------


def _script_env(manifest: Manifest, context: RunContext, workdir: Path, bin_dir: Path) -> dict[str, str]:
    # The PyInstaller bootloader leaves _PYI_* variables (and may point LD_LIBRARY_PATH at its
    # own libraries): the script, and the bundle started again by the shell helpers, must not
    # inherit them, or that second bundle believes it is already set up and fails to start.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("_PYI_", "_MEI"))}
    if "LD_LIBRARY_PATH_ORIG" in env:
        env["LD_LIBRARY_PATH"] = env.pop("LD_LIBRARY_PATH_ORIG")
    env.update(manifest.env)
    env.update(context.env)
    env.setdefault("PYTHONUNBUFFERED", "1")  # so that Python scripts' output streams live
    if context.api is not None:
        # The token stays in a 0600 file: never in the environment that `ps e` would show.
        token_file = workdir / API_TOKEN_FILE
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(context.api["token"])
        env.update({API_SOCKET_VARIABLE: context.api["socket"], API_TOKEN_FILE_VARIABLE: str(token_file)})
    env.update(
        {
            "CRONIUM_DIR": str(workdir),
            "CRONIUM_EXECUTION_ID": context.execution_id,
            "CRONIUM_EVENT": manifest.name,
            "CRONIUM_SERVER": context.server,
            "PATH": f"{bin_dir}:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}",
        }
    )
    return env


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except ValueError:
        return {"error": f"{path.name} is not valid JSON"}


def run_payload(
    data: bytes,
    *,
    sha256: str | None,
    context: RunContext,
    workroot: Path,
    reporter: Reporter,
    control: ControlChannel | None = None,
    keep_workdir: bool = False,
    helper_dir: Path | None = None,
) -> int:
    """Verify, extract, run and report one payload; returns the runner's exit code.

    ``helper_dir``: helper programs already installed (a runner session's); else they are
    installed into the work dir.
    """
    timings: dict[str, float] = {"started_at": time.time()}
    clock = time.monotonic()
    workdir: Path | None = None
    result: dict[str, Any] = {"type": "result", "outputs": None, "variables": {}, "timed_out": False}
    try:
        payload.verify(data, sha256)
        workdir = payload.make_workdir(workroot)
        manifest = payload.extract(data, workdir, sha256)
        timings["extract_s"] = time.monotonic() - clock
        interpreter = shutil.which(manifest.interpreter)
        if interpreter is None:
            raise RunnerError(
                RunnerExit.INTERPRETER_MISSING, f"interpreter {manifest.interpreter!r} for {manifest.type} not found"
            )
        event = {
            "id": None,
            "payload_version": None,
            **manifest.event,
            **context.event,
            "name": manifest.name,
            "type": manifest.type,
            "execution_id": context.execution_id,
            "server": context.server,
            # whole seconds print as such in shell (`cronium.event timeout` gives 30, not 30.0)
            "timeout": int(manifest.timeout) if float(manifest.timeout).is_integer() else manifest.timeout,
            "runner_version": __version__,
        }
        input_value = manifest.input if context.input is _UNSET else context.input
        if helper_dir is None:
            helper_dir = workdir / helpers.HELPER_DIR
            helpers.install_programs(helper_dir)
        bin_dir = helper_dir / "bin"
        helpers.write_run_data(workdir, input_value=input_value, variables=context.variables, event=event)
        argv = helpers.interpreter_argv(manifest.type, interpreter, helper_dir, manifest.entrypoint)
        env = _script_env(manifest, context, workdir, bin_dir)
        timings["prepare_s"] = time.monotonic() - clock - timings["extract_s"]
        supervisor = Supervisor(argv, workdir, env, manifest.timeout, manifest.grace_period, reporter, control)
        outcome = supervisor.run()
        timings["script_s"] = outcome.script_s
        result.update(
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            timed_out=outcome.timed_out,
            stop_reason=outcome.stop_reason,
            outputs=_read_json(workdir / OUTPUT_FILE, None),
            variables=_read_json(workdir / VARIABLES_FILE, {}),
            runner_error=None,
        )
        exit_code = outcome.exit_code
    except RunnerError as error:
        result.update(exit_code=int(error.code), runner_error={"code": error.code.slug, "message": str(error)})
        exit_code = int(error.code)
    finally:
        if workdir is not None and not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep_workdir and workdir is not None:
        result["workdir"] = str(workdir)
    timings["total_s"] = time.monotonic() - clock
    timings["finished_at"] = time.time()
    result["timings"] = timings
    with contextlib.suppress(OrchestratorGone):
        reporter.message(result)
    return exit_code
