"""An SSH server in this process, for testing the orchestrator without Docker.

:class:`SSHHub` runs asyncssh servers on one event loop in a background thread (the executor
runs its own loop in its own thread, and a test's thread blocks in ``Executor.run``, so neither
could host them). Each :class:`LocalSSHServer` is one "server": 127.0.0.1 on a port of its own,
its own host key (the client verifies it through a known_hosts file), public-key login for the
current user with the client key only, and its own home directory, so each has its own
``~/.cache/cronium``.

What it does with a session is what sshd does for a command without a terminal: the exec
request runs ``/bin/sh -c COMMAND`` as a real local process in a session of its own (setsid),
cwd and ``HOME`` the server's home, stdin/stdout/stderr piped to the channel with flow control
both ways; the exit status (or the signal) goes back once the process has exited and its output
pipes are closed. A signal request signals the process; a channel closed by the client (or a
dropped connection) closes the process's pipes, so it sees the end of its input and EPIPE on
output, as under sshd. Shell, subsystem and pty requests are refused.

Stream-local forwarding, which API mode and the runner daemon need, is asyncssh's own: remote
forwarding (the server listens on a Unix socket path and forwards connections back over SSH)
and direct stream-local channels (the client connects to a Unix socket on the server); both
can be switched off per server (``allow_stream_local=False``, like sshd's
``AllowStreamLocalForwarding no``). ``stall_exec=True`` accepts exec requests and never starts
them (a login stuck in a shell rc file); :meth:`LocalSSHServer.drop_connections` aborts every
connection (a dead link).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import getpass
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncssh

# Above this much of the client's data waiting for the process's stdin, the channel stops
# reading (the SSH window then stops the client); asyncio pauses us the same way at its own
# high-water mark of the pipe, which ends up calling pause_writing below.
STDIN_BUFFER = 1 << 20
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _short_temp_root() -> str:
    """A temp dir whose paths leave room for the runner daemon's socket (a Unix socket address
    holds 107 bytes; the daemon's path adds about 70 to the home directory)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 20 else "/tmp"


class _ExecSession(asyncssh.SSHServerSession):
    """One session channel: an exec request run as a local ``/bin/sh -c`` process."""

    def __init__(self, server: LocalSSHServer) -> None:
        self._server = server
        self._chan: asyncssh.SSHServerChannel | None = None
        self._command: str | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._pending: list[bytes] = []  # data that came before the process started
        self._eof_pending = False
        self._open_pipes = {1, 2}
        self._exited = False
        self._channel_gone = False

    # -- the channel's side

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def pty_requested(self, *args: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def session_started(self) -> None:
        if self._server.stall_exec:
            return  # accepted, never started: the client waits for output that never comes
        task = asyncio.ensure_future(self._start())
        self._server._tasks.add(task)
        task.add_done_callback(self._server._tasks.discard)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._transport is None:
            self._pending.append(data)
            if sum(map(len, self._pending)) > STDIN_BUFFER:
                self._chan.pause_reading()
            return
        stdin = self._transport.get_pipe_transport(0)
        if stdin is not None and not stdin.is_closing():
            stdin.write(data)

    def eof_received(self) -> bool:
        if self._transport is None:
            self._eof_pending = True
        else:
            self._close_stdin()
        return True  # half-open: the process's output still comes

    def signal_received(self, signal_name: str) -> None:
        number = getattr(signal, f"SIG{signal_name}", None)
        if self._transport is not None and number is not None and self._transport.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.send_signal(number)

    def break_received(self, msec: int) -> bool:
        return False

    def pause_writing(self) -> None:  # the channel's send window is full: stop reading output
        self._output_reading(False)

    def resume_writing(self) -> None:
        self._output_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        """The channel is closed (by the client, or with the connection): as sshd does, close
        the process's pipes; it sees the end of its input, and EPIPE when it writes."""
        self._channel_gone = True
        if self._transport is not None:
            self._close_stdin()
            for fd in (1, 2):
                pipe = self._transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()

    # -- the process's side (called by _Process)

    async def _start(self) -> None:
        server = self._server
        env = {
            "HOME": str(server.home),
            "USER": server.user,
            "LOGNAME": server.user,
            "SHELL": "/bin/sh",
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "LANG": "C.UTF-8",
        }
        loop = asyncio.get_running_loop()
        try:
            transport, _protocol = await loop.subprocess_exec(
                lambda: _Process(self),
                "/bin/sh",
                "-c",
                self._command or "",
                env=env,
                cwd=str(server.home),
                start_new_session=True,  # sshd's session child calls setsid()
            )
        except OSError as error:
            if not self._channel_gone:
                self._chan.write_stderr(f"cannot start /bin/sh: {error}\n".encode())
                self._chan.exit(127)
            return
        self._transport = transport
        server._processes.add(transport)
        if self._channel_gone:
            self.connection_lost(None)
            return
        pending, self._pending = self._pending, []
        for data in pending:
            self.data_received(data, None)
        self._chan.resume_reading()
        if self._eof_pending:
            self._close_stdin()

    def _close_stdin(self) -> None:
        stdin = self._transport.get_pipe_transport(0) if self._transport else None
        if stdin is not None and not stdin.is_closing():
            stdin.close()  # after the buffered data is written

    def _output_reading(self, on: bool) -> None:
        if self._transport is None:
            return
        for fd in self._open_pipes:
            pipe = self._transport.get_pipe_transport(fd)
            if pipe is not None and not pipe.is_closing():
                with contextlib.suppress(RuntimeError):
                    pipe.resume_reading() if on else pipe.pause_reading()

    def _output(self, fd: int, data: bytes) -> None:
        if self._channel_gone:
            return
        if fd == 1:
            self._chan.write(data)
        else:
            self._chan.write_stderr(data)

    def _pipe_closed(self, fd: int) -> None:
        self._open_pipes.discard(fd)
        self._maybe_finish()

    def _process_exited(self) -> None:
        self._exited = True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Once the process has exited and its output is all read: its exit status."""
        if not self._exited or self._open_pipes:
            return
        self._server._processes.discard(self._transport)
        code = self._transport.get_returncode()
        self._close_stdin()
        self._transport.close()
        if self._channel_gone:
            return
        if code is not None and code < 0:
            self._chan.exit_with_signal(signal.Signals(-code).name[3:])
        else:
            self._chan.exit(code if code is not None else 255)


class _Process(asyncio.SubprocessProtocol):
    def __init__(self, session: _ExecSession) -> None:
        self._session = session

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._session._output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self._session._pipe_closed(fd)

    def process_exited(self) -> None:
        self._session._process_exited()

    def pause_writing(self) -> None:  # the process's stdin pipe is full
        if self._session._chan is not None:
            self._session._chan.pause_reading()

    def resume_writing(self) -> None:
        if self._session._chan is not None:
            self._session._chan.resume_reading()


class _ServerConnection(asyncssh.SSHServer):
    """One client connection: public-key login for the server's user and the client key only."""

    def __init__(self, server: LocalSSHServer) -> None:
        self._server = server
        self._connection: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        self._server._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self._connection)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self._server.user and key.public_data == self._server.client_key.public_data

    def session_requested(self) -> asyncssh.SSHServerSession:
        return _ExecSession(self._server)

    def unix_server_requested(self, listen_path: str) -> bool:
        return self._server.allow_stream_local  # asyncssh listens there and forwards back

    def unix_connection_requested(self, dest_path: str) -> bool:
        return self._server.allow_stream_local  # asyncssh connects to the path for the client


class LocalSSHServer:
    """One "server" of an :class:`SSHHub`; its settings may be changed between runs."""

    def __init__(self, hub: SSHHub, name: str, client_key: asyncssh.SSHKey, root: Path) -> None:
        self.hub = hub
        self.name = name
        self.user = getpass.getuser()
        self.client_key = client_key
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.home = Path(tempfile.mkdtemp(prefix="h-", dir=root))
        self.allow_stream_local = True
        self.stall_exec = False
        self.port = 0
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._processes: set[asyncio.SubprocessTransport] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def host_key_line(self) -> str:
        """This server's known_hosts line."""
        public = self.host_key.export_public_key("openssh").decode().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    async def _start(self) -> None:
        self._acceptor = await asyncssh.create_server(
            lambda: _ServerConnection(self),
            "127.0.0.1",
            0,
            server_host_keys=[self.host_key],
            encoding=None,  # bytes both ways, as sshd passes them
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            # Like sshd's defaults: the orchestrator's own keepalives are what is under test.
            keepalive_interval=0,
        )
        self.port = self._acceptor.sockets[0].getsockname()[1]

    def drop_connections(self) -> None:
        """Abort every connection at once, as a dead link or a killed sshd would."""
        self.hub.call(self._drop())

    async def _drop(self) -> None:
        for conn in list(self._connections):
            conn.abort()

    def connection_count(self) -> int:
        return len(self._connections)

    def processes(self) -> list[int]:
        """Pids of the live processes this server started, directly or not: every process
        whose environment holds this server's home (the runner daemon and its sessions too)."""
        marker = f"HOME={self.home}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry))
        return found

    async def _stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        for conn in list(self._connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        for transport in list(self._processes):
            pid = transport.get_pid()
            if pid is not None and transport.get_returncode() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            transport.close()

    def _kill_leftovers(self) -> None:
        """Detached processes (the runner daemon, its sessions): by pid, only this server's."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)


class SSHHub:
    """The loop thread that hosts any number of :class:`LocalSSHServer`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cnssh-", dir=_short_temp_root()))
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = self.root / "id_ed25519"
        self.client_key.write_private_key(str(self.key_path))
        os.chmod(self.key_path, 0o600)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="inprocess-sshd", daemon=True)
        self._thread.start()
        self._servers: list[LocalSSHServer] = []

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        future: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def start_server(self, name: str) -> LocalSSHServer:
        server = LocalSSHServer(self, name, self.client_key, self.root)
        self.call(server._start())
        self._servers.append(server)
        return server

    def stop_server(self, server: LocalSSHServer) -> None:
        with contextlib.suppress(Exception):
            self.call(server._stop())
        server._kill_leftovers()
        if server in self._servers:
            self._servers.remove(server)

    def close(self) -> None:
        for server in list(self._servers):
            self.stop_server(server)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)


class LocalFleet:
    """Servers of an :class:`SSHHub` as an inventory: ``Server(name, "127.0.0.1", port, user,
    key_path, known_hosts)``, each host key trusted through one known_hosts file."""

    def __init__(self, hub: SSHHub, names: list[str], known_hosts: Path) -> None:
        self.hub = hub
        self.known_hosts = known_hosts
        self.members = {name: hub.start_server(name) for name in names}
        known_hosts.write_text("".join(server.host_key_line for server in self.members.values()))

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def __getitem__(self, name: str) -> LocalSSHServer:
        return self.members[name]

    def server(self, name: str, **changes: Any) -> Any:
        """The inventory entry of ``name`` (``changes``: other field values)."""
        from cronium_nb import Server

        member = self.members[name]
        fields = {
            "name": name,
            "host": "127.0.0.1",
            "port": member.port,
            "user": member.user,
            "key_path": str(self.hub.key_path),
            "known_hosts": str(self.known_hosts),
        }
        return Server(**{**fields, **changes})

    @property
    def inventory(self) -> Any:
        from cronium_nb import Inventory

        return Inventory([self.server(name) for name in self.members])

    def close(self) -> None:
        for server in self.members.values():
            self.hub.stop_server(server)
