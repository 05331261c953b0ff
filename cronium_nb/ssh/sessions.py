"""Where a connection's runs go: runner sessions kept per connection, and the runner daemon.

Each pooled connection keeps up to ``MAX_IDLE_SESSIONS`` idle :class:`RunnerSession` between
runs (each holds one of the connection's channels: this is the pool's
:class:`~cronium_nb.ssh.pool.ChannelKeeper`, giving one up when a caller needs the channel). A new session is,
by preference, a forked child of the runner daemon — one per user and server, listening on a
private Unix socket, reached through a stream-local channel, started here when it is not
running — so a new connection starts no runner; else a ``cronium-runner serve`` process.

A new connection to a server probed before (its facts are kept by the caller, e.g. the store's
``hosts`` table) goes straight to the daemon, which vouches for the deployment; otherwise the
deployer's probe runs.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Protocol

import asyncssh

from cronium_nb.model import Server
from cronium_nb.ssh.deploy import Deployer, DeployError, HostInfo, RunnerBuild
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.pool import PooledConnection
from cronium_nb.ssh.remote_run import RunnerSession, RunnerUnavailable

MAX_IDLE_SESSIONS = 1


class HostFacts(Protocol):
    """What the probes found, kept across executors (the store, through its worker thread)."""

    async def host_facts(self, address: str) -> dict[str, Any] | None: ...

    def remember_host(self, address: str, facts: dict[str, Any]) -> None: ...


class RunnerSessions:
    def __init__(self, deployer: Deployer, options: SSHOptions, hosts: HostFacts) -> None:
        self.deployer = deployer
        self.options = options
        self.hosts = hosts
        self._daemon_starts: dict[Any, asyncio.Lock] = {}
        # per connection: its idle sessions (each holding a channel), and whether the runner
        # daemon is reachable through it (absent: not tried yet)
        self._idle: weakref.WeakKeyDictionary[PooledConnection, list[RunnerSession]] = weakref.WeakKeyDictionary()
        self._daemon: weakref.WeakKeyDictionary[PooledConnection, bool] = weakref.WeakKeyDictionary()

    # -- the pool's ChannelKeeper

    def kept(self, pooled: PooledConnection) -> int:
        return len(self._idle.get(pooled, ()))

    def give_up(self, pooled: PooledConnection) -> RunnerSession | None:
        idle = self._idle.get(pooled)
        return idle.pop() if idle else None

    async def probe(self, pooled: PooledConnection, server: Server) -> HostInfo:
        """What a new connection's host is, and whether its runner is intact: from its runner
        daemon when the server was probed before and the daemon answers (no process is started),
        else from the deployer's probe."""
        known = self.deployer.known(pooled)
        if known is not None:
            return known
        facts = await self.hosts.host_facts(pooled.target.route)
        if facts is not None:
            remembered = HostInfo.from_facts(facts)
            if await self._reach_daemon(pooled, remembered):
                return remembered
        info = await self.deployer.host_info(pooled)
        if info.facts() != facts:
            self.hosts.remember_host(pooled.target.route, info.facts())
        return info

    async def take(self, pooled: PooledConnection, build: RunnerBuild) -> RunnerSession:
        """The connection's idle session of ``build``, or a new one."""
        idle = self._idle.get(pooled, [])
        while idle:
            candidate = idle.pop()
            if candidate.alive and candidate.build_name == build.remote_name:
                return candidate
            await candidate.aclose()
        return await self._open(pooled, build)

    async def give_back(self, pooled: PooledConnection, session: RunnerSession, reusable: bool) -> None:
        """Keep the session for the next run on this connection, or end it."""
        idle = self._idle.setdefault(pooled, [])
        if reusable and session.alive and len(idle) < MAX_IDLE_SESSIONS:
            idle.append(session)
        else:
            await asyncio.shield(session.aclose())

    def daemon_args(self, pooled: PooledConnection, build: RunnerBuild) -> list[str] | None:
        """The arguments that start ``build``'s runner daemon for ``pooled``'s host, or None when
        no daemon is wanted there (or its socket path would not fit)."""
        socket_path = self._daemon_socket(pooled, build, self.deployer.known(pooled))
        if socket_path is None:
            return None
        idle = f"{self.options.runner_daemon_idle_timeout:g}"
        return ["daemon", "--socket", socket_path, "--idle-timeout", idle]

    def _daemon_socket(self, pooled: PooledConnection, build: RunnerBuild, info: HostInfo | None) -> str | None:
        if not self.options.runner_daemon_idle_timeout or self._daemon.get(pooled) is False:
            return None
        if info is None or not info.home:
            return None
        return build.daemon_socket(info.home, info.host)

    async def _reach_daemon(self, pooled: PooledConnection, info: HostInfo) -> bool:
        """Whether the runner daemon of the build for ``info`` (the facts of an earlier probe)
        answers here; if it does, its session is kept for the run to take."""
        try:
            build = self.deployer.builds.choose(info)
        except DeployError:
            return False
        socket_path = self._daemon_socket(pooled, build, info)
        if socket_path is None:
            return False
        # sshd switches a connection to TCP_NODELAY only once a session runs a command; before
        # that every exchange on a stream-local channel waits for a delayed ACK (40 ms) from
        # sshd's TCP peer: a bastion or a port proxy as often as this client, so TCP_QUICKACK
        # here cannot replace it (benchmarks/analysis.md). A shell builtin is the cheapest
        # command there is (the probe, which would save a round trip where the daemon is gone,
        # costs the server ~10 ms more CPU on every new connection).
        nudge = await pooled.connection.create_process(":")
        try:
            session = await RunnerSession.connect(pooled.connection, socket_path, build.remote_name)
        except (asyncssh.ChannelOpenError, RunnerUnavailable):
            return False  # not running (idle, removed, replaced, another machine now): probe
        finally:
            nudge.close()
        self._daemon[pooled] = True
        self.deployer.vouched(pooled, info, build)
        self._idle.setdefault(pooled, []).append(session)  # the run takes it
        return True

    async def _open(self, pooled: PooledConnection, build: RunnerBuild) -> RunnerSession:
        """A session of the runner daemon (started if need be), else a runner process of its own
        (no daemon wanted, no room for its socket path, or no stream-local channels allowed)."""
        socket_path = self._daemon_socket(pooled, build, self.deployer.known(pooled))
        if socket_path is not None:
            for attempt in range(2):
                try:
                    session = await RunnerSession.connect(pooled.connection, socket_path, build.remote_name)
                except RunnerUnavailable:
                    break  # a daemon that accepts and dies before its hello: a process of our own
                except asyncssh.ChannelOpenError:
                    if attempt == 0:
                        try:
                            await self._start_daemon(pooled, build)
                        except RunnerUnavailable:
                            break  # it would not start here: a runner process per connection
                    continue
                self._daemon[pooled] = True
                return session
            self._daemon[pooled] = False
        return await RunnerSession.start(pooled.connection, build.command(["serve"]), build.remote_name)

    async def _start_daemon(self, pooled: PooledConnection, build: RunnerBuild) -> None:
        """Start the runner daemon (it detaches and says ``ready``; one that runs already says so)."""
        args = self.daemon_args(pooled, build)
        if args is None:
            raise RunnerUnavailable("no runner daemon wanted here")
        async with self._daemon_starts.setdefault(pooled.key, asyncio.Lock()):
            command = build.command(args)
            result = await pooled.connection.run(command, check=False, encoding="utf-8", errors="replace")
            if result.exit_status != 0 or not str(result.stdout).startswith("ready"):
                detail = str(result.stderr).strip()[-500:] or f"exit {result.exit_status}"
                raise RunnerUnavailable(f"the runner daemon did not start: {detail}")
