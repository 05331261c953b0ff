"""API mode's way back: a stream-local remote forward from the server to the runtime service.

While at least one API-mode run uses a pooled connection, that connection forwards a Unix socket
on the server, ``~/.cache/cronium/runner/api-<random>.sock`` (inside the run user's 0700 runner
directory, and made 0600 by sshd's StreamLocalBindMask), to the runtime service's own Unix
socket in this process. Only the run's user can connect to it; it exists only while a run needs
it, and is removed when the last one ends. Where sshd refuses stream-local forwarding, the
reason is kept on the connection and its runs fall back to bundled mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from cronium_nb.errors import CroniumError
from cronium_nb.ssh.deploy import RUNNER_DIR  # 0700, relative to the login user's home
from cronium_nb.ssh.pool import PooledConnection


class ForwardRefused(CroniumError):
    """The server would not open the forward; the message says why."""


@dataclass
class _Forward:
    """One pooled connection's forward: open while ``users`` runs hold it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    listener: asyncssh.SSHListener | None = None
    remote_path: str = ""
    users: int = 0
    refused: str | None = None  # why the server refused the forward, once it did


class ApiForwards:
    """The API forwards of all pooled connections (state kept per connection, here)."""

    def __init__(self) -> None:
        self._forwards: weakref.WeakKeyDictionary[PooledConnection, _Forward] = weakref.WeakKeyDictionary()

    async def acquire(self, pooled: PooledConnection, home: str, service_path: Path) -> str:
        """The server-side socket path of ``pooled``'s forward, opened if no run holds it yet;
        :class:`ForwardRefused` when the server will not forward."""
        forward = self._forwards.setdefault(pooled, _Forward())
        async with forward.lock:
            if forward.refused is not None:
                raise ForwardRefused(forward.refused)
            if forward.listener is None:
                remote_path = f"{home.rstrip('/')}/{RUNNER_DIR}/api-{secrets.token_hex(8)}.sock"
                try:
                    forward.listener = await pooled.connection.forward_remote_path(remote_path, str(service_path))
                except (asyncssh.ChannelListenError, asyncssh.Error, OSError) as error:
                    forward.refused = getattr(error, "reason", None) or str(error) or type(error).__name__
                    raise ForwardRefused(forward.refused) from None
                forward.remote_path = remote_path
            forward.users += 1
            return forward.remote_path

    async def release(self, pooled: PooledConnection) -> None:
        """One run is done with the forward; the last one closes it and removes its socket file
        (sshd leaves the file behind)."""
        forward = self._forwards.get(pooled)
        if forward is None:
            return
        async with forward.lock:
            if forward.listener is None:
                return
            forward.users -= 1
            if forward.users > 0:
                return
            listener, forward.listener = forward.listener, None
            listener.close()
            if pooled.alive:
                with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):  # else: swept at a runner start
                    await pooled.connection.run(f"rm -f -- {shlex.quote(forward.remote_path)}", check=False, timeout=10)
