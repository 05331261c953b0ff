"""``cronium-runner daemon``: runner sessions without a process start per SSH connection.

A session (``cronium-runner serve``) costs a runner start — tens of milliseconds of CPU — on
every new SSH connection. The daemon pays it once per user and server: it listens on a Unix
socket in the runner's private directory (0700, so only the user can connect), and forks one
child per connection, which serves that connection's runs exactly as ``serve`` does on its
stdin and stdout. The orchestrator reaches the socket through an SSH stream-local channel
(``direct-streamlocal``), so a new connection starts no process at all but that fork.

The daemon exits after ``idle_timeout`` seconds without a connection, and within 5 s once its
socket or any of its runner files is removed or replaced (a new deployment starts a new daemon). Its
children end with their connection; a run's processes are theirs (see ``execute``), so the
daemon itself never holds any of a job's processes.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

CHECK_INTERVAL_S = 5.0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_dev)


def _bind(path: Path) -> socket.socket | None:
    """A listening socket at ``path``; None when a live daemon already answers there."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return None  # someone else's: it serves
        except OSError:
            path.unlink(missing_ok=True)  # left by a daemon that died
            listener.bind(str(path))
        finally:
            probe.close()
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def run_daemon(
    path: Path,
    idle_timeout: float,
    *,
    sessions: Callable[[], AbstractContextManager[Callable[[], int]]],
    still_current: Callable[[], bool],
) -> int:
    """Bind, detach, print ``ready`` (so the starting channel can end) and accept until idle.

    ``sessions()`` is entered once detached, for as long as the daemon lives; it gives the
    function that runs a session on stdin/stdout (in each forked child). ``still_current`` says
    whether the runner on disk is still the one this daemon was started from.
    """
    old_umask = os.umask(0o077)
    try:
        listener = _bind(path)
    finally:
        os.umask(old_umask)
    if listener is None:
        print("ready (already running)", flush=True)
        return 0
    if os.fork():
        print("ready", flush=True)
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the SSH channel that started us must be able to close
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    with sessions() as serve:
        _accept(listener, path, idle_timeout, serve, still_current)
    return 0


def _accept(
    listener: socket.socket,
    path: Path,
    idle_timeout: float,
    serve: Callable[[], int],
    still_current: Callable[[], bool],
) -> None:
    socket_identity = _identity(path)
    last_connection = time.monotonic()
    while True:
        readable, _, _ = select.select([listener], [], [], CHECK_INTERVAL_S)
        if readable:
            connection, _ = listener.accept()
            last_connection = time.monotonic()
            if os.fork() == 0:
                listener.close()
                _serve_connection(connection, serve)
            connection.close()
            continue
        idle = time.monotonic() - last_connection > idle_timeout
        if idle or _identity(path) != socket_identity or not still_current():
            with contextlib.suppress(OSError):
                if _identity(path) == socket_identity:
                    path.unlink()
            return


def _serve_connection(connection: socket.socket, serve: Callable[[], int]) -> None:
    """In the forked child: the connection becomes stdin and stdout, then serve as a session."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the session waits for its scripts itself
    os.dup2(connection.fileno(), 0)
    os.dup2(connection.fileno(), 1)
    connection.close()
    code = 70
    try:
        code = serve()
    finally:
        os._exit(code)
