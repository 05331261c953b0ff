"""One server's part of an execution: connect → probe → deploy → API → run → apply.

A :class:`ServerRun` takes one server from a pooled connection to its stored result, using the
executor's parts (:class:`RunParts`: the pool, deployer, runner sessions, API forwards, runtime
service, store worker, metrics). Each step before the script is bounded by the event's timeout
plus grace (:class:`SetupDeadline`); whatever goes wrong ends as this server's row, with a
readable ``error`` and an ``error_kind`` (see :mod:`cronium_nb.errors`), and never takes the
other servers down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from cronium_nb.become import BecomeAuth, become_user
from cronium_nb.errors import CroniumError, DeployError, ErrorKind, RunnerUnavailable, SetupStalled
from cronium_nb.execution import Execution
from cronium_nb.metrics import Metrics
from cronium_nb.model import Event, Server, Status, variable_too_deep
from cronium_nb.redaction import Redactor
from cronium_nb.results import ServerResult
from cronium_nb.runtime_api import ApiRun, RuntimeService
from cronium_nb.ssh.api_forward import ApiForwards, ForwardRefused
from cronium_nb.ssh.deploy import Deployer, DeployOutcome, HostInfo, RunnerBuild
from cronium_nb.ssh.pool import ConnectionPool, PooledConnection
from cronium_nb.ssh.remote_run import RemoteRun, RunOutcome, uncancel
from cronium_nb.ssh.sessions import RunnerSession, RunnerSessions
from cronium_nb.store import SERVER_RESULT_FIELDS
from cronium_nb.store_worker import StoreWorker

SETUP_STEPS = {
    "connect": "connecting",
    "probe": "probing the server",
    "deploy": "deploying the runner",
    "become": "checking sudo",
    "api": "opening the API forward",
    "start": "starting the runner and waiting for its hello",
}


class SetupDeadline:
    """What is left of one server's time for the steps before its script runs: the event's
    timeout plus grace, shared by all of them (a stuck login shell, a hung NFS home or a silent
    sshd must never keep a server, and so the execution, waiting for ever)."""

    def __init__(self, event: Event) -> None:
        self.budget = event.timeout + event.grace_period
        self.at = asyncio.get_running_loop().time() + self.budget  # the loop's time

    async def bound(self, awaitable: Awaitable[Any], step: str) -> Any:
        remaining = max(0.0, self.at - asyncio.get_running_loop().time())
        try:
            if sys.version_info >= (3, 11):
                # wait_for can return a result that lands with a cancel, swallowing it (3.11)
                async with asyncio.timeout(remaining):
                    return await awaitable
            return await asyncio.wait_for(awaitable, remaining)
        except asyncio.TimeoutError:
            raise SetupStalled(
                f"stalled while {SETUP_STEPS[step]} ({step}): no progress within the event's timeout "
                f"plus grace ({self.budget:g} s)"
            ) from None


@dataclass(frozen=True)
class RunParts:
    """The executor's parts that a server run uses (one set per executor, on its loop)."""

    pool: ConnectionPool
    deployer: Deployer
    sessions: RunnerSessions
    forwards: ApiForwards
    runtime: RuntimeService
    store: StoreWorker
    metrics: Metrics
    become: BecomeAuth = field(default_factory=BecomeAuth)  # sudo: who needs a password, and it
    # (route, runner build) recorded in the store by this executor: a warm run's "cached" is
    # not written again (the plan shows when the runner was last found or put in place)
    recorded_runners: set[tuple[str, str]] = field(default_factory=set)


class ServerRun:
    """Runs one execution on one server and fills its :class:`ServerResult`."""

    def __init__(self, execution: Execution, server: Server, parts: RunParts) -> None:
        self.execution = execution
        self.server = server
        self.parts = parts
        self.result = execution.results[server.name]

    async def run(self, limit: asyncio.Semaphore) -> ServerResult:
        """The whole run, holding ``limit`` while it works; always returns the result, stored."""
        result, execution = self.result, self.execution
        started = time.monotonic()
        try:
            async with limit:
                result.status = Status.RUNNING
                execution.status(result, "connect")
                await self._connect_deploy_run()
        except asyncio.CancelledError:
            uncancel()
            self._fail("cancelled", result.error or "cancelled", Status.CANCELLED)
        except CroniumError as error:
            self._fail(error.error_kind, str(error))
        except (asyncssh.Error, OSError) as error:
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            self._fail("unreachable", f"connection to {self.server.address} failed: {reason}")
        except Exception as error:  # a bug here must not take the other servers down
            self._fail("internal", f"internal error: {type(error).__name__}: {error}")
        if result.error:
            result.error = execution.redactor.text(result.error)
        execution.truncation_marker(self.server.name)
        result.duration_s = time.monotonic() - started
        self.parts.metrics.record_server(result)
        fields = {name: getattr(result, name) for name in SERVER_RESULT_FIELDS}
        worker = self.parts.store
        worker.submit(worker.store.update_server, execution.execution_id, self.server.name, **fields)
        execution.status(result)
        return result

    def _fail(self, kind: ErrorKind, error: str, status: Status = Status.FAILED) -> None:
        self.result.status, self.result.error, self.result.error_kind = status, error, kind

    async def _connect_deploy_run(self) -> None:
        parts, result, execution = self.parts, self.result, self.execution
        clock = time.monotonic()
        deadline = SetupDeadline(execution.event)
        async with parts.pool.lease(self.server, deadline.bound, retry_until=deadline.at) as pooled:
            result.phases["connect"] = time.monotonic() - clock
            clock = time.monotonic()
            execution.status(result, "deploy")
            info: HostInfo = await deadline.bound(parts.sessions.probe(pooled, self.server), "probe")
            result.arch = info.machine
            outcome = await deadline.bound(self._deploy(pooled, force=False), "deploy")
            result.phases["deploy"] = time.monotonic() - clock
            variables = await execution.starting_variables()
            context = {
                "execution_id": execution.execution_id,
                "server": self.server.name,
                "input": execution.input,
                "variables": variables,
                "env": dict(execution.event.secrets),
                "event": {"id": execution.payload.event_id, "payload_version": execution.payload.version},
            }
            user = become_user(execution.event, self.server)
            become = None if user is None else await deadline.bound(parts.become.context(pooled, user), "become")
            if become is not None:
                context["become"] = become
                if become["password"]:
                    execution.redactor = Redactor([*execution.event.secrets.values(), become["password"]])
            api_run = await deadline.bound(self._open_api(pooled, info, context, variables), "api")
            execution.status(result, "run")
            try:
                try:
                    run = await self._run_payload(pooled, outcome.build, context, deadline)
                except RunnerUnavailable:
                    # Missing, broken or replaced on the server although we had it as good:
                    # deploy again, once.
                    parts.deployer.invalidate(pooled.key, outcome.build)
                    clock = time.monotonic()
                    outcome = await deadline.bound(self._deploy(pooled, force=True), "deploy")
                    result.phases["deploy"] += time.monotonic() - clock
                    run = await self._run_payload(pooled, outcome.build, context, deadline)
            finally:
                if api_run is not None:
                    parts.runtime.unregister(execution.execution_id, self.server.name)
                    await parts.forwards.release(pooled)
            result.phases.update(run.phases)
        self._apply(run, seeded=variables)
        if api_run is not None and run.result is not None:
            if api_run.output_set:
                result.outputs = execution.redactor.value(api_run.output)
            result.variables = execution.redactor.value(dict(api_run.variables))

    async def _deploy(self, pooled: PooledConnection, *, force: bool) -> DeployOutcome:
        """The deployer's ensure, counted in the metrics and the result."""
        on_deploy_failed = self.execution.callbacks.on_deploy_failed
        name = self.server.name
        try:
            outcome = await self.parts.deployer.ensure(
                pooled,
                force=force,
                on_attempt_failed=None if on_deploy_failed is None else functools.partial(on_deploy_failed, name),
                daemon_args=functools.partial(self.parts.sessions.daemon_args, pooled),
            )
        except DeployError:
            self.parts.metrics.record_deploy("failed")
            raise
        self.parts.metrics.record_deploy(outcome.state, outcome.bytes_sent)
        store, recorded = self.parts.store, (pooled.target.route, outcome.build.remote_name)
        if outcome.state != "cached" or recorded not in self.parts.recorded_runners:
            # remembered for the dry-run plan, which contacts no server
            store.submit(store.store.record_runner, *recorded, outcome.state)
            self.parts.recorded_runners.add(recorded)
        self.result.deploy = outcome.state
        self.result.attempts += outcome.attempts
        return outcome

    async def _run_payload(
        self, pooled: PooledConnection, build: RunnerBuild, context: dict[str, Any], deadline: SetupDeadline
    ) -> RunOutcome:
        """Run on the connection's idle runner session, or on a new one; keep it for the next run."""
        execution = self.execution

        def remote_run(session: RunnerSession) -> RemoteRun:
            return RemoteRun(
                session,
                context,
                execution.payload.data,
                execution.payload.sha256,
                timeout=execution.event.timeout,
                grace=execution.event.grace_period,
                on_lines=functools.partial(execution.lines, self.server.name),
                redactor=execution.redactor,
                room=execution.room_for_output,
            )

        return await self._on_session(pooled, build, deadline, remote_run)

    async def _on_session(
        self,
        pooled: PooledConnection,
        build: RunnerBuild,
        deadline: SetupDeadline,
        make_run: Callable[[RunnerSession], RemoteRun],
        then: Callable[[RunnerSession, RunOutcome], Awaitable[None]] | None = None,
    ) -> RunOutcome:
        """``make_run(session)`` run on the connection's idle runner session, or on a new one,
        then ``then(session, outcome)`` while the session is still held; the session is kept for
        the next run when the run left it usable."""
        sessions = self.parts.sessions
        clock = time.monotonic()
        session = await deadline.bound(sessions.take(pooled, build), "start")
        starting = time.monotonic() - clock
        run = make_run(session)
        try:
            outcome = await run.run()
            if then is not None:
                await then(session, outcome)
        finally:
            await sessions.give_back(pooled, session, run.reusable)
        outcome.phases["upload"] += starting  # opening a session, when none was idle
        return outcome

    async def _open_api(
        self, pooled: PooledConnection, info: HostInfo, context: dict[str, Any], variables: dict[str, Any]
    ) -> ApiRun | None:
        """API mode: make sure the runtime service and this connection's forward are up, register
        the run and put its endpoint and token into the context; else fall back to bundled."""
        execution, parts, result = self.execution, self.parts, self.result
        if not execution.api:
            result.helpers = "bundled"
            return None
        try:
            service_path = await parts.runtime.start()
        except OSError as error:  # here, not on the server: no socket directory, no room to bind
            result.helpers = f"bundled (API unavailable: the runtime service would not start: {error})"
            return None
        if not info.home:
            result.helpers = "bundled (API unavailable: the server did not say where its home directory is)"
            return None
        try:
            socket_path = await parts.forwards.acquire(pooled, info.home, service_path)
        except ForwardRefused as error:
            result.helpers = f"bundled (API unavailable: the server refused the forward: {error})"
            return None
        api_run = ApiRun(
            execution.execution_id,
            self.server.name,
            execution.event.name,
            execution.input,
            dict(variables),
            on_variable=self._variable_set,
            on_tool_call=self._tool_called,
        )
        token = parts.runtime.register(api_run, execution.event.timeout)
        context["api"] = {"socket": socket_path, "token": token}
        result.helpers = "api"
        return api_run

    def _variable_set(self, name: str, value: Any) -> None:
        """API mode: a variable the script set, stored at once and shown live."""
        redactor = self.execution.redactor
        name, value = redactor.text(name), redactor.value(value)
        self._store_variable(name, value)
        on_variable = self.execution.callbacks.on_variable
        if on_variable is not None:
            on_variable(self.server.name, name, value)

    def _tool_called(self, tool: str, arguments: Any, started: float, duration_s: float, error: str | None) -> None:
        redactor, store = self.execution.redactor, self.parts.store
        holds_secret = redactor.value(arguments) != arguments
        store.submit(
            store.store.record_tool_call,
            self.execution.execution_id,
            self.server.name,
            redactor.text(tool),
            started_at=started,
            duration_s=duration_s,
            error=None if error is None else redactor.text(error),
            arguments=None if holds_secret else json.dumps(arguments),  # never a secret in the store
        )

    def _store_variable(self, name: str, value: Any) -> None:
        worker, execution = self.parts.store, self.execution
        updated_by = f"{execution.execution_id}/{self.server.name}"
        worker.submit(worker.store.set_variable, execution.variable_scope, name, value, updated_by=updated_by)
        execution.variable_stored()

    def _apply(self, run: RunOutcome, seeded: dict[str, Any]) -> None:
        """The run's outcome into the result: status, error and its kind, exit code, outputs, and
        the variables it changed (stored)."""
        result, execution = self.result, self.execution
        report = run.result
        if run.cancelled:
            self._fail("cancelled", run.error or "cancelled", Status.CANCELLED)
        elif run.timed_out or (report and report.get("timed_out")):
            self._fail("timeout", run.error or f"timed out after {execution.event.timeout:g} s", Status.TIMEOUT)
        elif report is None:
            self._fail("unreachable", run.error or "connection lost during the run (no result from the runner)")
        elif report.get("runner_error"):
            kind: ErrorKind = "become" if report["runner_error"].get("code") == "become" else "runner"
            self._fail(kind, report["runner_error"]["message"])
        else:
            code = report.get("exit_code")
            if code == 0:
                result.status, result.error, result.error_kind = Status.SUCCESS, None, None
            else:
                self._fail("script", f"exit code {code}")
        if report is None:
            return
        result.exit_code = report.get("exit_code")
        result.outputs = execution.redactor.value(report.get("outputs"))
        result.variables = execution.redactor.value(report.get("variables") or {})
        # Only what this run changed: rewriting the values it was given could undo what a
        # concurrent run set meanwhile (API mode stores its changes live, as they happen).
        for name, value in result.variables.items():
            if name in seeded and seeded[name] == value:
                continue
            refused = variable_too_deep(name, value)
            if refused:
                self._fail("script", f"{refused}: not stored")
                continue
            self._store_variable(name, value)
