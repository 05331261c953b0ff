"""A pool of asyncssh connections: reused per server, bounded, health-checked, kept alive.

Each connection carries at most ``max_channels_per_connection`` sessions at once (below sshd's
MaxSessions); a server gets up to ``max_connections_per_server`` connections, the pool up to
``max_connections``; at most ``max_handshakes_per_host`` handshakes run at once against one host
(sshd drops connections beyond MaxStartups). Connections idle longer than ``idle_timeout`` are
closed; a closed one is dropped at the next acquire and replaced transparently.

A server is first resolved (:mod:`cronium_nb.ssh.resolve`: the inventory over the ssh config over
OpenSSH's defaults) and connections are shared by the resolved values. A server behind a jump
host (``jump:`` or ``ProxyJump``) is reached through an SSH tunnel on the jump host's pooled
connection, one connection per jump host shared by every server behind it, kept open while any
of them uses it. A connection refused or reset while connecting is tried again with back-off
(``SSHOptions.connect_attempts``/``connect_backoff``, never past the caller's deadline); a
refused key or a host key that does not match is not.

The pool knows connections and channels only. What others keep per connection (the deployer's
probe, the API forward, idle runner sessions) they keep themselves, keyed by the
:class:`PooledConnection`. Channels an owner keeps open between uses (idle runner sessions) are
counted through its :class:`ChannelKeeper`, which gives one up when a caller needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from cronium_nb.errors import ConnectError, HostKeyError
from cronium_nb.model import Server
from cronium_nb.ssh.hostkeys import connect_options, describe_host_key_failure
from cronium_nb.ssh.keys import KeyNeedsPassphrase, load_key
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.resolve import Resolver, Target

ServerKey = tuple[Any, ...]  # Target.key: the resolved values a connection is shared by
Bound = Callable[[Awaitable[Any], str], Awaitable[Any]]  # bound(awaitable, step): a deadline
_serials = itertools.count(1)
_RETRYABLE_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED)


class _Retryable(ConnectError):
    """Refused or reset while connecting: worth another attempt."""


@dataclass(eq=False)  # hashed by identity: owners key their per-connection state by it
class PooledConnection:
    connection: asyncssh.SSHClientConnection
    key: ServerKey
    target: Target
    channels: int = 0  # leased to callers now
    tunnels: int = 0  # connections of servers behind this one (a jump host) that go through it
    via: PooledConnection | None = None  # the jump host's connection this one goes through
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
    def __init__(
        self,
        options: SSHOptions,
        accept_new_file: Path,
        keeper: ChannelKeeper | None = None,
        servers: Callable[[], Mapping[str, Server]] | None = None,
    ) -> None:
        """``servers()``: the inventory's servers by name, which ``jump`` names refer to."""
        self.options = options
        self.accept_new_file = accept_new_file
        self.keeper = keeper
        self.resolver = Resolver(options, servers)
        self._connections: dict[ServerKey, list[PooledConnection]] = {}
        self._opening: dict[ServerKey, int] = {}
        self._jump_opening: dict[ServerKey, asyncio.Future] = {}  # a jump host's opening, shared
        self._handshakes: dict[tuple[str, int, ServerKey | None], asyncio.Semaphore] = {}
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task | None = None
        self.connects = 0
        self.connect_retries = 0

    def connections(self) -> list[PooledConnection]:
        """The connections open now (a snapshot)."""
        return [pooled for pooled_list in self._connections.values() for pooled in pooled_list]

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
        alive = []
        for pooled in self._connections.get(key, []):
            if pooled.alive:
                alive.append(pooled)
            elif pooled.via is not None:
                pooled.via.tunnels -= 1
                pooled.via = None
        self._connections[key] = alive

    @contextlib.asynccontextmanager
    async def lease(
        self,
        server: Server,
        bound: Callable[[Awaitable[PooledConnection], str], Awaitable[PooledConnection]] | None = None,
        retry_until: float | None = None,
    ) -> AsyncIterator[PooledConnection]:
        """A connection with one channel reserved for the caller. ``bound(awaitable, "connect")``,
        if given, bounds the wait for it (see the executor's SetupDeadline); no connect retry
        starts after ``retry_until`` (the loop's time), so a refused server fails with its reason."""
        acquiring = self._acquire(server, retry_until)
        pooled = await (bound(acquiring, "connect") if bound else acquiring)
        try:
            yield pooled
        finally:
            async with self._changed:
                pooled.channels -= 1
                pooled.last_used = time.monotonic()
                self._changed.notify_all()

    def resolve(self, server: Server) -> Target:
        """Where ``server``'s connection goes (see :mod:`cronium_nb.ssh.resolve`)."""
        return self.resolver.resolve(server)

    async def _acquire(self, server: Server, retry_until: float | None) -> PooledConnection:
        target = self.resolve(server)
        key = target.key
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
        return await self._open(target, retry_until, channels=1)

    async def _open(
        self, target: Target, retry_until: float | None, channels: int = 0, tunnels: int = 0
    ) -> PooledConnection:
        """A new connection to ``target``, whose ``_opening`` count the caller has raised."""
        key, opened = target.key, None
        try:
            opened = await self._connect(target, retry_until)
        finally:
            # No await until both are done, so no other task sees one without the other (and a
            # cancellation arriving now cannot lose the connection just opened).
            self._opening[key] -= 1
            if opened is not None:
                connection, via = opened
                pooled = PooledConnection(connection, key, target, channels=channels, tunnels=tunnels, via=via)
                self._connections.setdefault(key, []).append(pooled)
            await self._notify()
        return pooled

    async def _tunnel(self, jump: Target, retry_until: float | None) -> PooledConnection:
        """The jump host's pooled connection, counted as carrying one more tunnel (the caller
        gives it back with ``tunnels -= 1`` when its connection fails to open or is dropped).

        One opening at a time per jump host, whose outcome every server waiting for it shares:
        twenty servers behind a dead jump host fail together, after one round of attempts."""
        key = jump.key
        while True:
            async with self._changed:
                self._drop_dead(key)
                alive = self._connections[key]
                if alive:
                    chosen = min(alive, key=lambda c: c.tunnels)
                    chosen.tunnels += 1
                    return chosen
                pending = self._jump_opening.get(key)
                opener = pending is None and not self._opening.get(key)
                if opener:
                    pending = self._jump_opening[key] = asyncio.get_running_loop().create_future()
                    self._opening[key] = 1
                elif pending is None:  # opened as a target by another caller: wait for it
                    await self._changed.wait()
                    continue
            assert pending is not None
            if opener:
                await self._open_jump(jump, retry_until, pending)
            failure = await asyncio.shield(pending)
            if failure is not None:
                raise ConnectError(f"jump host {jump.name} failed: {failure}", error_kind=failure.error_kind)

    async def _open_jump(self, jump: Target, retry_until: float | None, pending: asyncio.Future) -> None:
        """Open the jump host's connection; ``pending`` gets None (opened, or this opener was
        cancelled: the others try again) or the ConnectError every waiter fails with."""
        outcome: ConnectError | None = None
        try:
            await self._open(jump, retry_until)
        except ConnectError as error:
            outcome = error
        finally:
            del self._jump_opening[jump.key]
            pending.set_result(outcome)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _connect(
        self, target: Target, retry_until: float | None
    ) -> tuple[asyncssh.SSHClientConnection, PooledConnection | None]:
        """A new connection (and the jump host's it goes through), tried again while it is
        refused or reset, ``connect_backoff`` apart, at most ``connect_attempts`` times and never
        starting after ``retry_until``."""
        options, loop = self.options, asyncio.get_running_loop()
        host_key_args = connect_options(target, self.accept_new_file)  # HostKeyError
        keys, skipped = [], []
        for path in target.key_files:
            try:
                keys.append(await asyncio.to_thread(load_key, path, options.passphrase))
            except KeyNeedsPassphrase:
                if target.origin("keys") == "inventory":
                    raise
                skipped.append(path)  # as ssh: a key of the config or a default one, passed over
        attempt = 0
        while True:
            attempt += 1
            via = await self._tunnel(target.jump, retry_until) if target.jump is not None else None
            try:
                connection = await self._connect_once(target, keys, host_key_args, via, skipped)
            except _Retryable as error:
                if via is not None:
                    await self._untunnel(via)
                delay = options.connect_backoff[min(attempt, len(options.connect_backoff)) - 1]
                late = retry_until is not None and loop.time() + delay >= retry_until
                if attempt >= options.connect_attempts or late:
                    tries = f"{attempt} attempts; " if attempt > 1 else ""
                    advice = f"is sshd running there, on port {target.port}?"
                    raise ConnectError(f"{error} ({tries}{advice})", error_kind=error.error_kind) from None
                self.connect_retries += 1
                await asyncio.sleep(delay)
                continue
            except BaseException:
                if via is not None:
                    await self._untunnel(via)
                raise
            self.connects += 1
            return connection, via

    async def _untunnel(self, via: PooledConnection) -> None:
        async with self._changed:
            via.tunnels -= 1
            via.last_used = time.monotonic()
            self._changed.notify_all()

    async def _connect_once(
        self,
        target: Target,
        keys: list[asyncssh.SSHKey],
        host_key_args: dict[str, Any],
        via: PooledConnection | None,
        skipped: list[str],
    ) -> asyncssh.SSHClientConnection:
        options = self.options
        address = target.address + (f" (through jump host {via.target.name})" if via is not None else "")
        semaphore = self._handshakes.setdefault(
            (target.host, target.port, via.key if via else None), asyncio.Semaphore(options.max_handshakes_per_host)
        )
        async with semaphore:
            try:
                return await asyncssh.connect(
                    target.host,
                    port=target.port,
                    tunnel=via.connection if via is not None else (),
                    config=None,  # resolved already (cronium_nb.ssh.resolve): nothing implicit
                    username=target.user,
                    # No key file and no agent: None, as asyncssh reads () as "load ~/.ssh/id_*
                    # yourself", which OpenSSH does not when the config names other IdentityFiles
                    # (with an agent, () must stay: asyncssh uses no agent without client keys).
                    client_keys=keys or (() if target.agent_path else None),
                    agent_path=target.agent_path,
                    agent_forwarding=target.forward_agent,
                    connect_timeout=target.connect_timeout,
                    keepalive_interval=options.keepalive_interval,
                    keepalive_count_max=options.keepalive_count_max,
                    encryption_algs=list(options.ciphers),
                    **host_key_args,
                )
            except asyncssh.HostKeyNotVerifiable as error:
                raise HostKeyError(describe_host_key_failure(target, error)) from None
            except asyncssh.PermissionDenied as error:
                used = [path for path in target.key_files if path not in skipped]
                tried = ", ".join([*used, *(["ssh-agent"] if target.agent_path else [])]) or "no key"
                passed_over = (
                    f"; passed over {', '.join(skipped)}: protected by a passphrase nobody could give "
                    "(SSHOptions(passphrase=...), ssh-add, or %cronium_unlock)"
                    if skipped
                    else ""
                )
                raise ConnectError(
                    f"{address} refused our key ({error.reason}; tried {tried}{passed_over}): authorize the key "
                    f"for {target.user} there, or set key_path / IdentityFile",
                    error_kind="auth",
                ) from None
            except asyncssh.ChannelOpenError as error:  # the jump host could not reach the target
                message = f"cannot reach {address}: the jump host said: {error.reason}"
                if error.code == asyncssh.OPEN_CONNECT_FAILED:
                    raise _Retryable(message) from None
                raise ConnectError(message) from None
            except asyncssh.ConnectionLost as error:  # reset during the handshake (e.g. MaxStartups)
                raise _Retryable(f"cannot reach {address}: connection lost while connecting ({error.reason})") from None
            except asyncssh.Error as error:
                raise ConnectError(f"SSH to {address} failed: {error.reason}") from None
            except (OSError, asyncio.TimeoutError) as error:
                if isinstance(error, asyncio.TimeoutError):
                    reason = f"no answer within {target.connect_timeout:g} s (ConnectTimeout)"
                else:  # asyncio's "Connect call failed" hides the errno's text
                    reason = os.strerror(error.errno) if error.errno else str(error)
                message = f"cannot reach {address}: {reason}"
                if isinstance(error, OSError) and error.errno in _RETRYABLE_ERRNOS:
                    raise _Retryable(message) from None
                raise ConnectError(message) from None

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.options.idle_timeout / 2))
            now = time.monotonic()
            async with self._changed:
                for key, connections in self._connections.items():
                    for pooled in connections:
                        idle = pooled.channels == 0 and pooled.tunnels == 0
                        if idle and now - pooled.last_used > self.options.idle_timeout:
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
