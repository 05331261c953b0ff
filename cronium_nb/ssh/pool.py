"""A pool of asyncssh connections: reused per server, bounded, health-checked, kept alive.

Each connection carries at most ``max_channels_per_connection`` sessions at once (below sshd's
MaxSessions); a server gets up to ``max_connections_per_server`` connections, the pool up to
``max_connections``; at most ``max_handshakes_per_host`` handshakes run at once against one host
(sshd drops connections beyond MaxStartups). Connections idle longer than ``idle_timeout`` are
closed; a closed one is dropped at the next acquire and replaced transparently.

The pool knows connections and channels only. What others keep per connection (the deployer's
probe, the API forward, idle runner sessions) they keep themselves, keyed by the
:class:`PooledConnection`. Channels an owner keeps open between uses (idle runner sessions) are
counted through its :class:`ChannelKeeper`, which gives one up when a caller needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from cronium_nb.errors import ConnectError, HostKeyError
from cronium_nb.model import Server
from cronium_nb.ssh.hostkeys import connect_options, describe_host_key_failure, parsed_file
from cronium_nb.ssh.options import SSHOptions

ServerKey = tuple[str, int, str, str | None, str | None]
Bound = Callable[[Awaitable[Any], str], Awaitable[Any]]  # bound(awaitable, step): a deadline
_serials = itertools.count(1)


def server_key(server: Server) -> ServerKey:
    return (server.host, server.port, server.user, server.key_path, server.known_hosts)


@dataclass(eq=False)  # hashed by identity: owners key their per-connection state by it
class PooledConnection:
    connection: asyncssh.SSHClientConnection
    key: ServerKey
    channels: int = 0  # leased to callers now
    last_used: float = field(default_factory=time.monotonic)
    serial: int = field(default_factory=lambda: next(_serials))  # unlike id(), never reused

    @property
    def alive(self) -> bool:
        return not self.connection.is_closed()


class Closable(Protocol):
    async def aclose(self) -> None: ...


class ChannelKeeper(Protocol):
    """An owner of channels kept open on pooled connections between uses."""

    def kept(self, pooled: PooledConnection) -> int:
        """How many of ``pooled``'s channels it keeps now."""
        ...

    def give_up(self, pooled: PooledConnection) -> Closable | None:
        """Stop keeping one of ``pooled``'s channels, and return what holds it, for the pool to
        close (outside its lock); None when it keeps none there."""
        ...


class ConnectionPool:
    def __init__(self, options: SSHOptions, accept_new_file: Path, keeper: ChannelKeeper | None = None) -> None:
        self.options = options
        self.accept_new_file = accept_new_file
        self.keeper = keeper
        self._connections: dict[ServerKey, list[PooledConnection]] = {}
        self._opening: dict[ServerKey, int] = {}
        self._handshakes: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task | None = None
        self.connects = 0

    def _count(self) -> int:
        return sum(len(c) for c in self._connections.values()) + sum(self._opening.values())

    def _kept(self, pooled: PooledConnection) -> int:
        return self.keeper.kept(pooled) if self.keeper is not None else 0

    def _give_up(self, pooled: PooledConnection) -> Closable | None:
        return self.keeper.give_up(pooled) if self.keeper is not None else None

    def _give_up_one(self, key: ServerKey) -> tuple[PooledConnection, Closable] | None:
        """A kept channel of one of the server's connections, given up by its keeper, and that
        connection; None when none keeps one."""
        for pooled in self._connections[key]:
            kept = self._give_up(pooled)
            if kept is not None:
                return pooled, kept
        return None

    def _drop_dead(self, key: ServerKey) -> None:
        self._connections[key] = [c for c in self._connections.get(key, []) if c.alive]

    @contextlib.asynccontextmanager
    async def lease(
        self,
        server: Server,
        bound: Callable[[Awaitable[PooledConnection], str], Awaitable[PooledConnection]] | None = None,
    ) -> AsyncIterator[PooledConnection]:
        """A connection with one channel reserved for the caller. ``bound(awaitable, "connect")``,
        if given, bounds the wait for it (see the executor's SetupDeadline)."""
        pooled = await (bound(self._acquire(server), "connect") if bound else self._acquire(server))
        try:
            yield pooled
        finally:
            async with self._changed:
                pooled.channels -= 1
                pooled.last_used = time.monotonic()
                self._changed.notify_all()

    async def _acquire(self, server: Server) -> PooledConnection:
        key = server_key(server)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        while True:
            async with self._changed:
                self._drop_dead(key)
                limit = self.options.max_channels_per_connection
                free = [c for c in self._connections[key] if c.channels + self._kept(c) < limit]
                if free:
                    chosen = min(free, key=lambda c: c.channels)
                    chosen.channels += 1
                    return chosen
                mine = len(self._connections[key]) + self._opening.get(key, 0)
                if mine < self.options.max_connections_per_server and self._count() < self.options.max_connections:
                    self._opening[key] = self._opening.get(key, 0) + 1
                    break
                # A kept channel (an idle runner session) is given up to a caller that needs one.
                given = self._give_up_one(key)
                if given is None:
                    await self._changed.wait()
                    continue
                donor, kept = given
                donor.channels += 1
            try:  # outside the lock: closing waits for the server to release the channel
                await kept.aclose()
            except BaseException:  # cancelled (a deadline, a cancel): the channel is not ours
                donor.channels -= 1
                await self._notify()
                raise
            return donor
        connection = None
        try:
            connection = await self._connect(server)
        finally:
            # No await until both are done, so no other task sees one without the other (and a
            # cancellation arriving now cannot lose the connection just opened).
            self._opening[key] -= 1
            if connection is not None:
                pooled = PooledConnection(connection, key, channels=1)
                self._connections.setdefault(key, []).append(pooled)
            await self._notify()
        return pooled

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _connect(self, server: Server) -> asyncssh.SSHClientConnection:
        options = self.options
        host_key_args = connect_options(server, options.host_key_policy, self.accept_new_file)  # HostKeyError
        try:
            client_keys = [parsed_file(server.key_path, asyncssh.read_private_key)] if server.key_path else ()
        except OSError as error:  # a missing or unreadable key file
            raise ConnectError(f"cannot use key {server.key_path}: {error.strerror}", error_kind="auth") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
            raise ConnectError(f"cannot use key {server.key_path}: {error}", error_kind="auth") from None
        semaphore = self._handshakes.setdefault(
            (server.host, server.port), asyncio.Semaphore(options.max_handshakes_per_host)
        )
        async with semaphore:
            try:
                connection = await asyncssh.connect(
                    server.host,
                    port=server.port,
                    username=server.user,
                    client_keys=client_keys,
                    agent_path=None,
                    connect_timeout=options.connect_timeout,
                    keepalive_interval=options.keepalive_interval,
                    keepalive_count_max=options.keepalive_count_max,
                    **host_key_args,
                )
            except asyncssh.HostKeyNotVerifiable as error:
                raise HostKeyError(describe_host_key_failure(server, options.host_key_policy, error)) from None
            except asyncssh.PermissionDenied as error:
                raise ConnectError(f"{server.address} refused our key ({error.reason})", error_kind="auth") from None
            except asyncssh.Error as error:
                raise ConnectError(f"SSH to {server.address} failed: {error.reason}") from None
            except (OSError, asyncio.TimeoutError) as error:
                if isinstance(error, asyncio.TimeoutError):
                    reason = f"no answer within {options.connect_timeout:g} s"
                else:  # asyncio's "Connect call failed" hides the errno's text
                    reason = os.strerror(error.errno) if error.errno else str(error)
                raise ConnectError(f"cannot reach {server.address}: {reason}") from None
        self.connects += 1
        return connection

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.options.idle_timeout / 2))
            now = time.monotonic()
            async with self._changed:
                for key, connections in self._connections.items():
                    for pooled in connections:
                        if pooled.channels == 0 and now - pooled.last_used > self.options.idle_timeout:
                            pooled.connection.close()
                    self._drop_dead(key)

    def connection_count(self) -> int:
        return sum(1 for group in self._connections.values() for c in group if c.alive)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for connections in self._connections.values():
            for pooled in connections:
                pooled.connection.close()
        for connections in self._connections.values():
            for pooled in connections:
                with contextlib.suppress(Exception):
                    await pooled.connection.wait_closed()
        self._connections.clear()
