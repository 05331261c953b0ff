"""Where a connection's runs go: runner sessions kept per connection, and the runner daemon.

Each pooled connection keeps up to ``MAX_IDLE_SESSIONS`` idle :class:`RunnerSession` between
runs (each holds one of the connection's channels, so the pool counts them). A new session is,
by preference, a forked child of the runner daemon — one per user and server, listening on a
private Unix socket, reached through a stream-local channel, started here when it is not
running — so a new connection starts no runner; else a ``cronium-runner serve`` process.

A new connection to a server probed before (its facts are kept by the caller, e.g. the store's
``hosts`` table) goes straight to the daemon, which vouches for the deployment; otherwise the
deployer's probe runs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import asyncssh

from cronium_nb.model import Server
from cronium_nb.ssh.deploy import Deployer, DeployError, HostInfo, RunnerBuild
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.pool import PooledConnection
from cronium_nb.ssh.remote_run import RunnerSession, RunnerUnavailable

MAX_IDLE_SESSIONS = 1


class HostFacts(Protocol):
    """What the probes found, kept across executors (the store implements it)."""

    def host_facts(self, address: str) -> dict[str, Any] | None: ...

    def remember_host(self, address: str, facts: dict[str, Any]) -> None: ...


class RunnerSessions:
    def __init__(self, deployer: Deployer, options: SSHOptions, hosts: HostFacts) -> None:
        self.deployer = deployer
        self.options = options
        self.hosts = hosts
        self._daemon_starts: dict[Any, asyncio.Lock] = {}

    async def probe(self, pooled: PooledConnection, server: Server) -> HostInfo:
        """What a new connection's host is, and whether its runner is intact: from its runner
        daemon when the server was probed before and the daemon answers (no process is started),
        else from the deployer's probe."""
        if pooled.info is None and not await self._reach_daemon(pooled, server):
            facts = (await self.deployer.host_info(pooled)).facts()
            if facts != self.hosts.host_facts(server.address):
                self.hosts.remember_host(server.address, facts)
        return pooled.info

    async def take(self, pooled: PooledConnection, build: RunnerBuild) -> RunnerSession:
        """The connection's idle session of ``build``, or a new one."""
        while pooled.sessions:
            candidate = pooled.sessions.pop()
            if candidate.alive and candidate.build_name == build.remote_name:
                return candidate
            await candidate.aclose()
        return await self._open(pooled, build)

    async def give_back(self, pooled: PooledConnection, session: RunnerSession, reusable: bool) -> None:
        """Keep the session for the next run on this connection, or end it."""
        if reusable and session.alive and len(pooled.sessions) < MAX_IDLE_SESSIONS:
            pooled.sessions.append(session)
        else:
            await asyncio.shield(session.aclose())

    def _daemon_socket(self, pooled: PooledConnection, build: RunnerBuild, info: HostInfo | None) -> str | None:
        if not self.options.runner_daemon_idle_timeout or pooled.daemon is False or info is None or not info.home:
            return None
        return build.daemon_socket(info.home, info.host)

    async def _reach_daemon(self, pooled: PooledConnection, server: Server) -> bool:
        facts = self.hosts.host_facts(server.address)
        if facts is None:
            return False
        info = HostInfo.from_facts(facts)
        try:
            build = self.deployer.builds.choose(info)
        except DeployError:
            return False
        socket_path = self._daemon_socket(pooled, build, info)
        if socket_path is None:
            return False
        # sshd switches a connection to TCP_NODELAY only once a session runs a command; before
        # that every exchange on a stream-local channel waits for a delayed ACK (40 ms). A shell
        # builtin is the cheapest command there is.
        nudge = await pooled.connection.create_process(":")
        try:
            session = await RunnerSession.connect(pooled.connection, socket_path, build.remote_name)
        except (asyncssh.ChannelOpenError, RunnerUnavailable):
            return False  # not running (idle, removed, replaced, another machine now): probe
        finally:
            nudge.close()
        pooled.info, pooled.daemon = info, True
        pooled.probed_builds = {build.remote_name: 0}  # the daemon vouches: deploy state "verified"
        pooled.sessions.append(session)  # the run takes it
        return True

    async def _open(self, pooled: PooledConnection, build: RunnerBuild) -> RunnerSession:
        """A session of the runner daemon (started if need be), else a runner process of its own
        (no daemon wanted, no room for its socket path, or no stream-local channels allowed)."""
        socket_path = self._daemon_socket(pooled, build, pooled.info)
        if socket_path is not None:
            for attempt in range(2):
                try:
                    session = await RunnerSession.connect(pooled.connection, socket_path, build.remote_name)
                except asyncssh.ChannelOpenError:
                    if attempt == 0:
                        try:
                            await self._start_daemon(pooled, build, socket_path)
                        except RunnerUnavailable:
                            break  # it would not start here: a runner process per connection
                    continue
                pooled.daemon = True
                return session
            pooled.daemon = False
        return await RunnerSession.start(pooled.connection, build.command(["serve"]), build.remote_name)

    async def _start_daemon(self, pooled: PooledConnection, build: RunnerBuild, socket_path: str) -> None:
        """Start the runner daemon (it detaches and says ``ready``; one that runs already says so)."""
        async with self._daemon_starts.setdefault(pooled.key, asyncio.Lock()):
            idle = f"{self.options.runner_daemon_idle_timeout:g}"
            command = build.command(["daemon", "--socket", socket_path, "--idle-timeout", idle])
            result = await pooled.connection.run(command, check=False, encoding="utf-8", errors="replace")
            if result.exit_status != 0 or not str(result.stdout).startswith("ready"):
                detail = str(result.stderr).strip()[-500:] or f"exit {result.exit_status}"
                raise RunnerUnavailable(f"the runner daemon did not start: {detail}")
