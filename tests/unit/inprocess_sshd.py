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

Stream-local forwarding, which API mode and the runner daemon need: remote forwarding (the
server listens on a Unix socket path and forwards connections back over SSH) and direct
stream-local channels (the client connects to a Unix socket on the server), with sshd's
half-close rules (see :class:`_Bridge`); both can be switched off per server (``allow_stream_local=False``, like sshd's
``AllowStreamLocalForwarding no``). TCP forwarding (``direct-tcpip``: what a jump host does for
``ssh -J`` and asyncssh's ``tunnel=``) is on, as sshd's ``AllowTcpForwarding yes``, switched off
by ``allow_tcp_forwarding=False``; each forwarded connection is recorded in ``forwarded`` (its
destination and the local port it came from), and each client connection's peer address in
``peers``, so a test can tell that a connection came through a jump host.
:meth:`LocalSSHServer.stop_listening` and :meth:`LocalSSHServer.listen` close and reopen the
server's port (connections refused meanwhile); ``connections_made`` counts the client
connections accepted (handshakes begun). ``stall_exec=True`` accepts exec requests and never starts
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
import subprocess
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncssh

# Above this much of the client's data waiting for the process's stdin, the channel stops
# reading (the SSH window then stops the client); it reads again below half of it.
STDIN_BUFFER = 1 << 20
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _short_temp_root() -> str:
    """A temp dir whose paths leave room for the runner daemon's socket (a Unix socket address
    holds 107 bytes; the daemon's path adds about 70 to the home directory)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 20 else "/tmp"


class _ExecSession(asyncssh.SSHServerSession):
    """One session channel: an exec request run as a local ``/bin/sh -c`` process.

    The process's pipes are plain non-blocking file descriptors watched by the loop (not
    asyncio's pipe transports, whose close races with their own start-up callbacks under a
    process that exits at once, so that a reused descriptor could get the wrong reader)."""

    def __init__(self, server: LocalSSHServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._chan: asyncssh.SSHServerChannel | None = None
        self._command: str | None = None
        self.process: subprocess.Popen | None = None
        self._stdin: int | None = None
        self._stdin_buffer = bytearray()  # for the process's stdin, not yet written
        self._stdin_eof = False  # the client's end of data: close stdin once the buffer is out
        self._outputs: dict[int, int] = {}  # our read end -> 1 (stdout) or 2 (stderr)
        self._paused = False
        self._exit_status: int | None = None
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
        self._start()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._stdin is None:
            return  # stdin is closed (the process went): the data has nowhere to go
        if not self._stdin_buffer:
            self._loop.add_writer(self._stdin, self._write_stdin)
        self._stdin_buffer += data
        if len(self._stdin_buffer) > STDIN_BUFFER:
            self._chan.pause_reading()  # the SSH window then stops the client

    def eof_received(self) -> bool:
        self._stdin_eof = True
        if not self._stdin_buffer:
            self._close_stdin()
        return True  # half-open: the process's output still comes

    def signal_received(self, signal_name: str) -> None:
        number = getattr(signal, f"SIG{signal_name}", None)
        if self.process is not None and number is not None and self._exit_status is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(number)

    def break_received(self, msec: int) -> bool:
        return False

    def pause_writing(self) -> None:  # the channel's send window is full: stop reading output
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)

    def resume_writing(self) -> None:
        self._paused = False
        for fd in self._outputs:
            self._loop.add_reader(fd, self._read_output, fd)

    def connection_lost(self, exc: Exception | None) -> None:
        """The channel is closed (by the client, or with the connection): as sshd does, close
        the process's pipes; it sees the end of its input, and EPIPE when it writes."""
        self._channel_gone = True
        self._stdin_buffer.clear()
        self._close_stdin()
        for fd in list(self._outputs):
            self._close_output(fd)

    # -- the process's side

    def _start(self) -> None:
        server = self._server
        env = {
            "HOME": str(server.home),
            "USER": server.user,
            "LOGNAME": server.user,
            "SHELL": "/bin/sh",
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "LANG": "C.UTF-8",
        }
        try:
            process = subprocess.Popen(
                ["/bin/sh", "-c", self._command or ""],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=server.home,
                start_new_session=True,  # sshd's session child calls setsid()
            )
        except OSError as error:
            self._chan.write_stderr(f"cannot start /bin/sh: {error}\n".encode())
            self._chan.exit(127)
            return
        self.process = process
        server._sessions.add(self)
        # Our ends as bare descriptors, owned here (the file objects give them up).
        self._stdin = os.dup(process.stdin.fileno())
        self._outputs = {os.dup(process.stdout.fileno()): 1, os.dup(process.stderr.fileno()): 2}
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        for fd in (self._stdin, *self._outputs):
            os.set_blocking(fd, False)
        for fd in self._outputs:
            self._loop.add_reader(fd, self._read_output, fd)
        threading.Thread(target=self._wait, args=(process,), daemon=True).start()

    def _wait(self, process: subprocess.Popen) -> None:  # in a thread of its own
        status = process.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the hub is gone
            self._loop.call_soon_threadsafe(self._process_exited, status)

    def _write_stdin(self) -> None:
        try:
            written = os.write(self._stdin, self._stdin_buffer)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the process does not read any more; drop the rest
            self._stdin_buffer.clear()
            self._close_stdin()
            return
        del self._stdin_buffer[:written]
        if not self._stdin_buffer:
            self._loop.remove_writer(self._stdin)
            if self._stdin_eof:
                self._close_stdin()
        if len(self._stdin_buffer) <= STDIN_BUFFER // 2 and not self._channel_gone:
            self._chan.resume_reading()  # last: it may hand over more data at once

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            self._loop.remove_writer(self._stdin)
            os.close(self._stdin)
            self._stdin = None

    def _read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_output(fd)
            self._maybe_finish()
        elif not self._channel_gone:
            if self._outputs[fd] == 1:
                self._chan.write(data)
            else:
                self._chan.write_stderr(data)

    def _close_output(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._outputs[fd]

    def _process_exited(self, status: int) -> None:
        self._exit_status = status
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Once the process has exited and its output is all read: its exit status (a closed
        stdin then, as sshd closes it)."""
        if self._exit_status is None or self._outputs:
            return
        self._server._sessions.discard(self)
        self._stdin_buffer.clear()
        self._close_stdin()
        if self._channel_gone:
            return
        if self._exit_status < 0:
            self._chan.exit_with_signal(signal.Signals(-self._exit_status).name[3:])
        else:
            self._chan.exit(self._exit_status)


class _Bridge(asyncssh.SSHUNIXSession):
    """A stream-local channel joined to a Unix socket connection on the "server", with sshd's
    half-close rules: an end of data in one direction is passed on, and both are closed once
    both directions have ended (asyncssh's own forwarder keeps the channel open when the socket
    ends first, where sshd closes it). Flow control both ways."""

    def __init__(self) -> None:
        self._chan: asyncssh.SSHUNIXChannel | None = None
        self.socket: _SocketSide | None = None
        self._early = bytearray()  # from the socket before the channel was open
        self._socket_eof = self._chan_eof = False

    # the channel's side
    def connection_made(self, chan: asyncssh.SSHUNIXChannel) -> None:
        self._chan = chan
        if self._early:
            chan.write(bytes(self._early))
            self._early.clear()
        if self._socket_eof:
            chan.write_eof()
        self.socket.transport.resume_reading()
        self._maybe_close()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.socket.transport.write(data)

    def eof_received(self) -> bool:
        self._chan_eof = True
        if self.socket.transport.can_write_eof():
            self.socket.transport.write_eof()
        self._maybe_close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.socket.transport.close()

    def pause_writing(self) -> None:
        self.socket.transport.pause_reading()

    def resume_writing(self) -> None:
        self.socket.transport.resume_reading()

    # the socket's side (called by _SocketSide)
    def socket_data(self, data: bytes) -> None:
        if self._chan is None:
            self._early += data
            self.socket.transport.pause_reading()
        else:
            self._chan.write(data)

    def socket_eof(self) -> None:
        self._socket_eof = True
        if self._chan is not None:
            self._chan.write_eof()
            self._maybe_close()

    def socket_lost(self) -> None:
        if self._chan is not None:
            self._chan.close()

    def _maybe_close(self) -> None:
        if self._socket_eof and self._chan_eof and self._chan is not None:
            self.socket.transport.close()
            self._chan.close()


class _SocketSide(asyncio.Protocol):
    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge
        bridge.socket = self
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bridge.socket_data(data)

    def eof_received(self) -> bool:
        self.bridge.socket_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.socket_lost()

    def pause_writing(self) -> None:
        if self.bridge._chan is not None:
            self.bridge._chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge._chan is not None:
            self.bridge._chan.resume_reading()


class _UnixListener(asyncssh.SSHListener):
    """A remote forward: the server listens on a Unix socket path (mode 0600, as sshd's
    StreamLocalBindMask makes it) and forwards each connection back to the client. The file is
    left behind when the forward ends, as sshd leaves it."""

    def __init__(self, server: asyncio.AbstractServer) -> None:
        super().__init__()
        self._server = server

    def get_port(self) -> int:
        return 0

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def _listen(conn: asyncssh.SSHServerConnection, listen_path: str) -> _UnixListener | bool:
    if os.path.lexists(listen_path):
        return False  # sshd's StreamLocalBindUnlink no: an existing file is not replaced

    async def forward_back(side: _SocketSide) -> None:
        try:
            await conn.create_unix_connection(lambda: side.bridge, listen_path)
        except (asyncssh.Error, OSError):
            side.transport.close()

    def accepted() -> _SocketSide:
        side = _SocketSide(_Bridge())
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(forward_back(side)))
        return side

    try:
        server = await asyncio.get_running_loop().create_unix_server(accepted, listen_path)
    except OSError:
        return False
    os.chmod(listen_path, 0o600)
    return _UnixListener(server)


async def _connect(dest_path: str) -> _Bridge:
    """A direct stream-local channel: connected first, so that a refusal is the channel's."""
    bridge = _Bridge()
    try:
        await asyncio.get_running_loop().create_unix_connection(lambda: _SocketSide(bridge), dest_path)
    except OSError as error:
        reason = f"{dest_path}: {error.strerror or error}"
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
    bridge.socket.transport.pause_reading()  # until the channel is open
    return bridge


class _TCPBridge(_Bridge, asyncssh.SSHTCPSession):
    """A ``direct-tcpip`` channel joined to a TCP connection the "server" opened."""


async def _connect_tcp(server: LocalSSHServer, host: str, port: int) -> _TCPBridge:
    """A direct TCP channel: connected first, so that a refusal is the channel's (as sshd's
    "open failed: connect failed: Connection refused")."""
    bridge = _TCPBridge()
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: _SocketSide(bridge), host, port)
    except OSError as error:
        reason = f"connect failed: {os.strerror(error.errno) if error.errno else error}"
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
    server.forwarded.append((host, port, transport.get_extra_info("sockname")[1]))
    transport.pause_reading()  # until the channel is open
    return bridge


class _ServerConnection(asyncssh.SSHServer):
    """One client connection: public-key login for the server's user and the client key only."""

    def __init__(self, server: LocalSSHServer) -> None:
        self._server = server
        self._connection: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        self._server._connections.add(conn)
        self._server.connections_made += 1
        self._server.peers.append(conn.get_extra_info("peername")[:2])

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

    def unix_server_requested(self, listen_path: str) -> Any:
        return self._server.allow_stream_local and _listen(self._connection, listen_path)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        if not self._server.allow_tcp_forwarding:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "TCP forwarding is off")
        return _connect_tcp(self._server, dest_host, dest_port)

    def unix_connection_requested(self, dest_path: str) -> Any:
        if not self._server.allow_stream_local:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "stream-local forwarding is off")
        return _connect(dest_path)


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
        self.allow_tcp_forwarding = True
        self.stall_exec = False
        self.port = 0
        self.connections_made = 0
        self.peers: list[tuple[str, int]] = []  # each client connection's (address, port)
        self.forwarded: list[tuple[str, int, int]] = []  # direct-tcpip: (host, port, from local port)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._sessions: set[_ExecSession] = set()  # those whose process runs

    @property
    def host_key_line(self) -> str:
        """This server's known_hosts line."""
        public = self.host_key.export_public_key("openssh").decode().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    async def _start(self) -> None:
        self._acceptor = await asyncssh.create_server(
            lambda: _ServerConnection(self),
            "127.0.0.1",
            self.port,
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

    def stop_listening(self) -> None:
        """Close the port: new connections are refused (those open go on)."""
        self.hub.call(self._stop_listening())

    async def _stop_listening(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    def listen(self) -> None:
        """Open the port again (the same number)."""
        self.hub.call(self._start())

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
        for session in list(self._sessions):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(session.process.pid, signal.SIGKILL)
            session.connection_lost(None)

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

    def server(self, member_name: str, **changes: Any) -> Any:
        """The inventory entry of a member (``changes``: other field values, a name too)."""
        from cronium_nb import Server

        member = self.members[member_name]
        fields = {
            "name": member_name,
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
