"""Command line: ``cronium-runner version | run | serve | daemon | helper``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cronium_runner import __version__
from cronium_runner.exitcodes import RunnerError, RunnerExit
from cronium_runner.protocol import MAGIC

if TYPE_CHECKING:
    from cronium_runner.execute import FramedReporter

DEFAULT_WORKROOT = "~/.cache/cronium/runs"
MAX_STDIN_PAYLOAD = 256 * 1024 * 1024


def flavour() -> str:
    """``bundle`` (PyInstaller, no Python needed), ``zipapp`` (.pyz) or ``source``."""
    if getattr(sys, "frozen", False):
        return "bundle"
    if __loader__.__class__.__name__ == "zipimporter" or ".pyz" in (__file__ or ""):
        return "zipapp"
    return "source"


def version_info() -> dict[str, str]:
    return {
        "version": __version__,
        "flavour": flavour(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "protocol": MAGIC.decode().strip(),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cronium-runner", description="Runs cronium payloads.")
    commands = parser.add_subparsers(dest="command", required=True)
    version = commands.add_parser("version", help="print version, flavour and architecture")
    version.add_argument("--json", action="store_true")
    run = commands.add_parser("run", help="run a payload.tar.gz ('-': read it from stdin, framed mode)")
    run.add_argument("payload")
    run.add_argument("--sha256", help="expected SHA-256 of the payload; on mismatch nothing runs")
    run.add_argument(
        "--framed",
        action="store_true",
        help="orchestrator mode: framed output on stdout, run context and control lines on stdin",
    )
    run.add_argument("--context", type=Path, help="local mode: JSON file with execution_id, server, input, variables")
    run.add_argument("--input", dest="input_json", help="local mode: the run's input as JSON")
    run.add_argument("--keep-workdir", action="store_true", help="do not remove the work dir afterwards")
    run.add_argument("--workroot", default=os.environ.get("CRONIUM_WORKROOT", DEFAULT_WORKROOT))
    run.add_argument("--report", type=Path, help="local mode: also write the result JSON to this file")
    serve = commands.add_parser(
        "serve",
        help="orchestrator mode, long-lived: run one framed payload after another from stdin until it ends",
    )
    serve.add_argument("--workroot", default=os.environ.get("CRONIUM_WORKROOT", DEFAULT_WORKROOT))
    daemon = commands.add_parser(
        "daemon",
        help="orchestrator mode, per user: serve sessions over a private Unix socket, one forked process each",
    )
    daemon.add_argument("--socket", required=True, type=Path, help="socket path, in a private (0700) directory")
    daemon.add_argument("--idle-timeout", type=float, default=600.0, help="exit after this long without a session")
    daemon.add_argument("--workroot", default=os.environ.get("CRONIUM_WORKROOT", DEFAULT_WORKROOT))
    helper = commands.add_parser("helper", help="runtime helpers for shell scripts (cronium.input, ...)")
    helper.add_argument("verb")
    helper.add_argument("args", nargs=argparse.REMAINDER)
    return parser


class _Stdin:
    """Reads stdin unbuffered so the bytes after the context line stay for the control channel."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def _fill(self) -> bool:
        os.set_blocking(0, True)  # a run's control channel leaves it non-blocking
        data = os.read(0, 65536)
        self.buffer += data
        return bool(data)

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if not self._fill():
                raise RunnerError(RunnerExit.NO_PAYLOAD, "stdin ended before the run context line")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise RunnerError(
                    RunnerExit.NO_PAYLOAD, f"stdin ended after {len(self.buffer)} of {size} payload bytes"
                )
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def _run(args: argparse.Namespace) -> int:
    from cronium_runner.execute import ControlChannel, FramedReporter, RunContext, TextReporter, run_payload

    reporter = FramedReporter() if args.framed else TextReporter(args.report)
    if args.framed:
        reporter.message({"type": "hello", **version_info(), "pid": os.getpid()})
    control = None
    try:
        context_data: dict = {}
        if args.framed:
            stdin = _Stdin()
            context_data = json.loads(stdin.line() or b"{}")
            if args.payload == "-":
                size = context_data.get("payload_size")
                if not isinstance(size, int) or not 0 < size <= MAX_STDIN_PAYLOAD:
                    raise RunnerError(RunnerExit.USAGE, "run context needs payload_size for a payload on stdin")
                data = stdin.exactly(size)
            control = ControlChannel(0, bytes(stdin.buffer))
        else:
            if args.payload == "-":
                raise RunnerError(RunnerExit.USAGE, "a payload on stdin needs --framed")
            if args.context:
                context_data = json.loads(args.context.read_text())
            if args.input_json is not None:
                context_data["input"] = json.loads(args.input_json)
        if args.payload != "-":
            try:
                data = Path(args.payload).read_bytes()
            except OSError as error:
                raise RunnerError(
                    RunnerExit.NO_PAYLOAD, f"cannot read payload {args.payload}: {error.strerror}"
                ) from None
        context = RunContext.from_dict(context_data)
    except RunnerError as error:
        reporter.message(
            {
                "type": "result",
                "exit_code": int(error.code),
                "runner_error": {"code": error.code.slug, "message": str(error)},
            }
        )
        return int(error.code)
    except ValueError as error:
        reporter.message(
            {
                "type": "result",
                "exit_code": int(RunnerExit.USAGE),
                "runner_error": {"code": "usage", "message": str(error)},
            }
        )
        return int(RunnerExit.USAGE)
    return run_payload(
        data,
        sha256=args.sha256,
        context=context,
        workroot=Path(os.path.expanduser(args.workroot)),
        reporter=reporter,
        control=control,
        keep_workdir=args.keep_workdir,
    )


Identity = tuple[tuple[str, int, int, int], ...]


def _executable_identity() -> Identity | None:
    """Name, inode, size and mtime of every file of this runner, the executable first — the
    bundle's folder, or the zipapp (None: run from source); empty if a file has gone. The same
    metadata the deployment's listing holds: a runner whose files are still these is the one
    that was verified when it started."""
    kind = flavour()
    if kind == "source":
        return None
    executable = Path(sys.executable if kind == "bundle" else sys.argv[0])
    paths = [executable]
    if kind == "bundle":
        root = executable.parent
        paths += [root, *sorted(path for path in root.rglob("*") if path != executable)]
    identity = [(str(path), *_stat_identity(path)) for path in paths]
    return () if any(len(entry) == 1 for entry in identity) else tuple(identity)


def _stat_identity(path: Path) -> tuple[int, ...]:
    try:
        stat = path.lstat()
    except OSError:
        return ()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _serve(args: argparse.Namespace, identity: Identity | None, helper_dir: Path | None = None) -> int:
    """Run payloads one after another, each as ``run - --framed`` would, on one channel.

    Saves the process start (tens of milliseconds) on every run but the first. Each request is
    a JSON line ``{"op": "run", "sha256": ..., "payload_size": ..., <run context>}`` followed by
    the payload; the run's frames end with its ``result`` message. A runner whose files on disk
    were removed or replaced since it started (``identity``: as they were then) says ``stale`` and
    exits, so the orchestrator deploys again instead of running an old runner: all of them are
    checked when the session starts (a new connection), the executable before every run (one
    stat, not forty). ``helper_dir``: helper programs installed by the daemon; without it the
    session installs its own.
    """
    from cronium_runner.execute import FramedReporter

    reporter = FramedReporter()
    workroot = Path(os.path.expanduser(args.workroot))
    reporter.message({"type": "hello", **version_info(), "pid": os.getpid(), "serve": True})
    own_helpers = helper_dir is None
    if own_helpers:
        helper_dir = _session_helper_dir(workroot)
    try:
        return _serve_requests(reporter, identity, workroot, helper_dir)
    finally:
        if own_helpers and helper_dir is not None:
            shutil.rmtree(helper_dir.parent, ignore_errors=True)


SESSION_DIR_PREFIX = "session-"


def _session_helper_dir(workroot: Path) -> Path | None:
    """A private dir for this session's helper programs, ``session-<pid>-<random>`` in the work
    root; those of sessions whose process is gone (killed, so they could not clean up) go.
    None when the work root is unsafe: each run then fails on it, with the reason."""
    from cronium_runner import helpers, payload

    try:
        payload.private_dir(workroot)
    except RunnerError:
        return None
    for entry in workroot.glob(f"{SESSION_DIR_PREFIX}*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    helper_dir = Path(tempfile.mkdtemp(prefix=f"{SESSION_DIR_PREFIX}{os.getpid()}-", dir=workroot)) / "helpers"
    try:
        helpers.install_programs(helper_dir)
    except OSError:
        shutil.rmtree(helper_dir.parent, ignore_errors=True)
        return None  # a full disk, say: each run then fails on its work dir, with the reason
    return helper_dir


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve_requests(
    reporter: FramedReporter, identity: Identity | None, workroot: Path, helper_dir: Path | None
) -> int:
    from cronium_runner.execute import ControlChannel, RunContext, run_payload

    intact = _executable_identity() == identity  # every file, once per session

    def executable_unchanged() -> bool:  # before every run: one stat
        return not identity or _stat_identity(Path(identity[0][0])) == identity[0][1:]

    stdin = _Stdin()
    while True:
        try:
            line = stdin.line()
        except RunnerError:
            return 0  # stdin ended: the orchestrator closed the session
        request = json.loads(line or b"{}")
        if request.get("op") != "run":
            continue  # e.g. a stop that arrived after its run had ended
        if not intact or not executable_unchanged():
            reporter.message({"type": "stale", "reason": "the runner on disk changed since this process started"})
            return 0
        try:
            size = request.get("payload_size")
            if not isinstance(size, int) or not 0 < size <= MAX_STDIN_PAYLOAD:
                raise RunnerError(RunnerExit.USAGE, "a run request needs payload_size")
            data = stdin.exactly(size)
            context = RunContext.from_dict(request)
        except RunnerError as error:
            reporter.message(
                {"type": "result", "exit_code": int(error.code),
                 "runner_error": {"code": error.code.slug, "message": str(error)}}
            )  # fmt: skip
            if error.code == RunnerExit.NO_PAYLOAD:
                return int(error.code)
            continue
        control = ControlChannel(0, bytes(stdin.buffer))
        run_payload(data, sha256=request.get("sha256"), context=context, workroot=workroot, reporter=reporter,
                    control=control, helper_dir=helper_dir)  # fmt: skip
        if control.ended:
            return 0
        stdin.buffer = bytearray(control.leftover())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            info = version_info()
            print(
                json.dumps(info)
                if args.json
                else f"cronium-runner {info['version']} ({info['flavour']}, {info['arch']})"
            )
            return 0
        if args.command == "serve":
            return _serve(args, _executable_identity())
        if args.command == "daemon":
            # Imported once here, not in every forked session (ctypes: the child subreaper).
            import ctypes  # noqa: F401

            from cronium_runner import execute, helpers, payload  # noqa: F401
            from cronium_runner.daemon import run_daemon

            identity = _executable_identity()  # the children compare against the daemon's start

            @contextlib.contextmanager
            def sessions() -> Iterator[Callable[[], int]]:
                helper_dir = _session_helper_dir(Path(os.path.expanduser(args.workroot)))
                try:
                    yield lambda: _serve(args, identity, helper_dir)
                finally:
                    if helper_dir is not None:
                        shutil.rmtree(helper_dir.parent, ignore_errors=True)

            return run_daemon(
                args.socket,
                args.idle_timeout,
                sessions=sessions,
                still_current=lambda: _executable_identity() == identity,
            )
        if args.command == "helper":
            from cronium_runner.helpers import run_helper

            return run_helper(args.verb, args.args)
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: say so, with a distinct exit code
        print(f"cronium-runner: internal error: {error!r}", file=sys.stderr)
        return int(RunnerExit.INTERNAL)
