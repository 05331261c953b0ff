"""API mode's way back: a stream-local remote forward from the server to the runtime service.

While at least one API-mode run uses a pooled connection, that connection forwards a Unix socket
on the server, ``~/.cache/cronium/runner/api-<random>.sock`` (inside the run user's 0700 runner
directory, and made 0600 by sshd's StreamLocalBindMask), to the runtime service's own Unix
socket in this process. Only the run's user can connect to it; it exists only while a run needs
it, and is removed when the last one ends. Where sshd refuses stream-local forwarding, the
reason is kept on the connection and its runs fall back to bundled mode.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from cronium_nb.ssh.pool import PooledConnection

REMOTE_DIR = ".cache/cronium/runner"  # relative to the login user's home; 0700 (see deploy)


class ForwardRefused(Exception):
    """The server would not open the forward; the message says why."""


@dataclass
class ApiForward:
    """The open forward of one pooled connection."""

    listener: asyncssh.SSHListener
    remote_path: str
    users: int = 0


async def acquire(pooled: PooledConnection, home: str, service_path: Path) -> str:
    """The server-side socket path of ``pooled``'s forward, opened if no run holds it yet."""
    async with pooled.tunnel_lock:
        if pooled.tunnel_refused is not None:
            raise ForwardRefused(pooled.tunnel_refused)
        if pooled.tunnel is None:
            remote_path = f"{home.rstrip('/')}/{REMOTE_DIR}/api-{secrets.token_hex(8)}.sock"
            try:
                listener = await pooled.connection.forward_remote_path(remote_path, str(service_path))
            except (asyncssh.ChannelListenError, asyncssh.Error, OSError) as error:
                pooled.tunnel_refused = getattr(error, "reason", None) or str(error) or type(error).__name__
                raise ForwardRefused(pooled.tunnel_refused) from None
            pooled.tunnel = ApiForward(listener, remote_path)
        pooled.tunnel.users += 1
        return pooled.tunnel.remote_path


async def release(pooled: PooledConnection) -> None:
    """One run is done with the forward; the last one closes it and removes its socket file
    (sshd leaves the file behind)."""
    async with pooled.tunnel_lock:
        forward = pooled.tunnel
        if forward is None:
            return
        forward.users -= 1
        if forward.users > 0:
            return
        pooled.tunnel = None
        forward.listener.close()
        if pooled.alive:
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):  # else: swept at a runner start
                await pooled.connection.run(f"rm -f -- {shlex.quote(forward.remote_path)}", check=False, timeout=10)
