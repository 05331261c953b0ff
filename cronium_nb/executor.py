"""The executor: runs an event on many servers at once and gives back an ExecutionResult.

All network work happens on one private event loop in a background thread, which owns the
connection pool. The public API has sync and async twins::

    ex = Executor(inventory=inv)
    res = ex.run(event, servers="web")            # blocks; Ctrl-C cancels the remote work
    job = ex.submit(event, servers="all")         # returns at once: job.cancel(), job.result()
    res = await ex.run_async(event, servers=[...])
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pandas as pd

from cronium_nb.config import state_dir as resolve_state_dir
from cronium_nb.inventory import Inventory
from cronium_nb.model import Event, Server, Status, check_input, variable_too_deep
from cronium_nb.payload import PayloadService, PreparedPayload
from cronium_nb.redaction import Redactor
from cronium_nb.results import PHASES, ExecutionResult, ServerResult, overall_status
from cronium_nb.runtime_api import ApiRun, RuntimeService
from cronium_nb.ssh import api_forward
from cronium_nb.ssh.deploy import DEFAULT_BACKOFF_S, Deployer, DeployError, RunnerBuild, RunnerBuilds
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.pool import ConnectError, ConnectionPool, PooledConnection
from cronium_nb.ssh.remote_run import RemoteRun, RunnerUnavailable, RunOutcome, uncancel
from cronium_nb.ssh.sessions import RunnerSessions
from cronium_nb.store import SERVER_RESULT_FIELDS, LogBuffer, LogChunk, Store
from cronium_nb.tools import ToolRegistry

DEFAULT_RUNNER_DIST = Path(__file__).resolve().parent.parent / "runner" / "dist"  # `make runner` builds it
DEFAULT_CONCURRENCY = 32
DEFAULT_MAX_LOG_BYTES = 2**30  # stored log text per execution; a runaway script cannot fill the disk
LOG_FLUSH_INTERVAL_S = 0.5
_UNSET: Any = object()


@dataclass
class Callbacks:
    """Live notifications from the executor's thread (keep them quick; they run on its loop).

    ``on_line(server, stream, text, ts)`` for each output line; ``on_status(result)`` when a
    server's status or phase changes; ``on_deploy_failed(server, attempt, reason)``;
    ``on_variable(server, name, value)`` when a script sets a variable in API mode.
    """

    on_line: Callable[[str, str, str, float], None] | None = None
    on_status: Callable[[ServerResult], None] | None = None
    on_deploy_failed: Callable[[str, int, str], None] | None = None
    on_variable: Callable[[str, str, Any], None] | None = None  # API mode: (server, name, value), live


class SetupStalled(Exception):
    """A step before the script (connect, probe, deploy, API forward, runner start) did not
    finish within the event's timeout plus grace; the message names the step."""


SETUP_STEPS = {
    "connect": "connecting",
    "probe": "probing the server",
    "deploy": "deploying the runner",
    "api": "opening the API forward",
    "start": "starting the runner and waiting for its hello",
}


class SetupDeadline:
    """What is left of one server's time for the steps before its script runs: the event's
    timeout plus grace, shared by all of them (a stuck login shell, a hung NFS home or a silent
    sshd must never keep a server, and so the execution, waiting for ever)."""

    def __init__(self, event: Event) -> None:
        self.budget = event.timeout + event.grace_period
        self._at = asyncio.get_running_loop().time() + self.budget

    async def bound(self, awaitable: Awaitable[Any], step: str) -> Any:
        remaining = max(0.0, self._at - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(awaitable, remaining)
        except asyncio.TimeoutError:
            raise SetupStalled(
                f"stalled while {SETUP_STEPS[step]} ({step}): no progress within the event's timeout "
                f"plus grace ({self.budget:g} s)"
            ) from None


class Metrics:
    """Counters and per-phase durations of one executor."""

    def __init__(self, samples: int = 10_000) -> None:
        self.executions: Counter[str] = Counter()
        self.deployments: Counter[str] = Counter()
        self.phases: dict[str, deque[float]] = {phase: deque(maxlen=samples) for phase in PHASES}
        self.bytes_deployed = 0

    def record_server(self, result: ServerResult) -> None:
        for phase, seconds in result.phases.items():
            self.phases[phase].append(seconds)

    def frame(self) -> pd.DataFrame:
        rows: list[tuple[str, float]] = [("executions.total", sum(self.executions.values()))]
        rows += [(f"executions.{s.value}", self.executions[s.value]) for s in RESULT_STATUSES]
        total = sum(self.deployments.values())
        cached = self.deployments["cached"] + self.deployments["verified"]
        rows += [
            ("deployments.total", total),
            ("deployments.success", self.deployments["deployed"]),
            ("deployments.failed", self.deployments["failed"]),
            ("deployments.cached", cached),
            ("deployments.cache_hit_rate", cached / total if total else float("nan")),
            ("deployments.bytes_sent", self.bytes_deployed),
        ]
        for phase, samples in self.phases.items():
            values = sorted(samples)
            rows.append((f"phase.{phase}.count", len(values)))
            if values:
                rows += [
                    (f"phase.{phase}.mean_s", statistics.fmean(values)),
                    (f"phase.{phase}.p50_s", statistics.median(values)),
                    (f"phase.{phase}.max_s", values[-1]),
                ]
        # object dtype keeps counts as integers next to the float durations
        return pd.DataFrame({"metric": [m for m, _ in rows], "value": pd.Series([v for _, v in rows], dtype=object)})


RESULT_STATUSES = (Status.SUCCESS, Status.PARTIAL, Status.FAILED, Status.TIMEOUT, Status.CANCELLED)


class _LoopThread:
    """A private asyncio loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cronium-executor", daemon=True)
        self._thread.start()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> tuple[asyncio.Task, concurrent.futures.Future]:
        """Start ``coroutine`` as a task on the loop; its result also lands in a thread-safe future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        holder: list[asyncio.Task] = []
        started = threading.Event()

        def start() -> None:
            task = self.loop.create_task(coroutine)
            holder.append(task)

            def finished(done: asyncio.Task) -> None:
                if done.cancelled():
                    future.set_exception(concurrent.futures.CancelledError())
                elif done.exception() is not None:
                    future.set_exception(done.exception())
                else:
                    future.set_result(done.result())

            task.add_done_callback(finished)
            started.set()

        self.loop.call_soon_threadsafe(start)
        started.wait()
        return holder[0], future

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class Job:
    """A running execution: ``cancel()``, ``wait(timeout)``, ``result()``, ``done()``."""

    def __init__(self, executor: Executor, execution_id: str, task: asyncio.Task, future: concurrent.futures.Future):
        self.execution_id = execution_id
        self._executor = executor
        self._task = task
        self._future = future

    def cancel(self) -> None:
        """Stop the remote work on every server (returns at once; ``result()`` waits for it)."""
        self._executor._loop_thread.loop.call_soon_threadsafe(self._task.cancel)

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the execution ends; True when it has."""
        concurrent.futures.wait([self._future], timeout=timeout)
        return self._future.done()

    def result(self, timeout: float | None = None) -> ExecutionResult:
        return self._future.result(timeout)

    @property
    def status(self) -> Status:
        if self._future.done() and self._future.exception() is None:
            return self._future.result().status
        return Status.RUNNING

    def __repr__(self) -> str:
        return f"<Job {self.execution_id} {self.status.value}>"


@dataclass
class _Execution:
    """State of one execution while it runs (on the loop)."""

    execution_id: str
    event: Event
    payload: PreparedPayload
    input: Any
    callbacks: Callbacks
    log: LogBuffer
    api: bool
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    results: dict[str, ServerResult] = field(default_factory=dict)
    seq: Counter[str] = field(default_factory=Counter)
    stored_bytes: int = 0  # of log text, all servers together
    dropped: dict[str, list[int]] = field(default_factory=dict)  # server -> [lines, bytes] not stored

    def __post_init__(self) -> None:
        self.redactor = Redactor(self.event.secrets.values())

    def lines(self, server: str, stream: str, text: str, count: int, ts: float) -> None:
        """``count`` lines of one stream, joined by newlines (secrets already redacted, as they
        streamed: see RemoteRun). From the first chunk that would pass the execution's
        ``max_log_bytes`` on, they are counted, not stored (see :meth:`truncation_marker`), so
        what is stored is a prefix of the output; they are still shown live."""
        first_seq = self.seq[server] + 1
        self.seq[server] += count
        size = len(text)
        if not self.dropped and self.stored_bytes + size <= self.max_log_bytes:
            self.stored_bytes += size
            self.log.add_chunk(LogChunk(self.execution_id, server, first_seq, count, ts, stream, text))
        else:
            dropped = self.dropped.setdefault(server, [0, 0])
            dropped[0] += count
            dropped[1] += size
        if self.callbacks.on_line is not None:
            for line in text.split("\n"):
                self.callbacks.on_line(server, stream, line, ts)

    def truncation_marker(self, server: str) -> None:
        """Once a server is done: a last line saying how much of its output was not stored."""
        if server in self.dropped:
            lines, size = self.dropped[server]
            self.seq[server] += 1
            text = (
                f"[cronium] output truncated: {lines} lines ({size / 2**20:.1f} MiB) not stored, over this "
                f"execution's limit of {self.max_log_bytes / 2**20:.0f} MiB of stored output (max_log_bytes)"
            )
            self.log.add_chunk(LogChunk(self.execution_id, server, self.seq[server], 1, time.time(), "cronium", text))

    def status(self, result: ServerResult, phase: str | None = None) -> None:
        result.phase = phase
        if self.callbacks.on_status is not None:
            self.callbacks.on_status(result)


class Executor:
    """Runs events on servers over SSH. See the module docstring for the API.

    ``deploy_attempts`` and ``deploy_backoff`` (seconds before each retry) govern runner
    deployment; ``concurrency`` bounds servers worked on at once; ``continue_on_failure=False``
    cancels the other servers at the first failure; ``max_log_bytes`` bounds the output text
    stored per execution (1 GiB): past it lines are counted, not stored, and each server's log
    ends with a ``cronium`` stream line saying how much was dropped.
    """

    def __init__(
        self,
        inventory: Inventory | None = None,
        *,
        state_dir: str | Path | None = None,
        ssh_options: SSHOptions | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        continue_on_failure: bool = True,
        deploy_attempts: int = 3,
        deploy_backoff: Iterable[float] = DEFAULT_BACKOFF_S,
        runner_dist: str | Path | None = None,
        variable_scope: str = "global",
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_log_bytes < 0:
            raise ValueError("max_log_bytes must be 0 or more")
        self.max_log_bytes = max_log_bytes
        self.inventory = inventory or Inventory()
        self.state_dir = resolve_state_dir(state_dir)
        self.ssh_options = ssh_options or SSHOptions()
        self.concurrency = concurrency
        self.continue_on_failure = continue_on_failure
        self.variable_scope = variable_scope
        self.store = Store(self.state_dir)
        self.payloads = PayloadService(self.store, self.state_dir)
        builds = RunnerBuilds(Path(runner_dist) if runner_dist else DEFAULT_RUNNER_DIST)
        self.deployer = Deployer(builds, backoff=tuple(deploy_backoff), attempts=deploy_attempts)
        self.sessions = RunnerSessions(self.deployer, self.ssh_options, self.store)
        accept_new = self.ssh_options.accept_new_known_hosts or self.state_dir / "known_hosts"
        self._metrics = Metrics()
        self.tools = ToolRegistry()
        self._runtime = RuntimeService(self.tools)
        self._loop_thread = _LoopThread()
        self.pool: ConnectionPool = self._loop_thread.call(self._make_pool(accept_new))
        self._closed = False

    async def _make_pool(self, accept_new: Path) -> ConnectionPool:
        return ConnectionPool(self.ssh_options, accept_new)

    # -- public API

    def submit(
        self,
        event: Event,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        input: Any = _UNSET,
        timeout: float | None = None,
        continue_on_failure: bool | None = None,
        callbacks: Callbacks | None = None,
        api: bool = False,
    ) -> Job:
        """Start running ``event`` and return a :class:`Job` at once.

        Everything is checked before anything is sent: unknown servers or groups, the event, the
        input and the timeout raise here. ``api=True`` gives the script's helpers a live line to
        this process (variables set on the server are seen here at once, see ``on_variable``);
        where the SSH forward cannot be opened the run falls back to bundled mode and says so.
        """
        self._check_open()
        event, targets, run_input = self._validate(event, servers, input, timeout)
        execution_id = uuid.uuid4().hex[:12]
        keep_going = self.continue_on_failure if continue_on_failure is None else continue_on_failure
        coroutine = self._execute(execution_id, event, targets, run_input, keep_going, callbacks or Callbacks(), api)
        task, future = self._loop_thread.spawn(coroutine)
        return Job(self, execution_id, task, future)

    def run(self, event: Event, servers: Any = None, **options: Any) -> ExecutionResult:
        """Run and wait. Ctrl-C (KeyboardInterrupt) cancels the remote work and returns the
        cancelled result once every server has stopped; a second Ctrl-C stops waiting."""
        job = self.submit(event, servers, **options)
        try:
            return job.result()
        except KeyboardInterrupt:
            job.cancel()
            return job.result()

    async def run_async(self, event: Event, servers: Any = None, **options: Any) -> ExecutionResult:
        """The awaitable twin of :meth:`run`, usable from any event loop."""
        job = self.submit(event, servers, **options)
        try:
            return await asyncio.wrap_future(job._future)
        except asyncio.CancelledError:
            job.cancel()
            await asyncio.shield(asyncio.wrap_future(job._future))
            raise

    def metrics(self) -> pd.DataFrame:
        return self._metrics.frame()

    def history(self, limit: int = 50) -> pd.DataFrame:
        return self.store.history(limit)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop_thread.call(self.pool.close(), timeout=30)
        with contextlib.suppress(Exception):
            self._loop_thread.call(self._runtime.close(), timeout=10)
        self._loop_thread.stop()
        self.store.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- validation

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this executor is closed")

    def _validate(self, event: Event, servers: Any, run_input: Any, timeout: float | None):
        if not isinstance(event, Event):
            raise TypeError(f"expected a cronium_nb.Event, got {type(event).__name__}")
        if timeout is not None:
            event = dataclasses.replace(event, timeout=timeout)  # re-validated
        if run_input is _UNSET:
            run_input = event.input
        else:
            check_input(run_input)
        if servers is not None and not isinstance(servers, str):
            servers = list(servers)
            if servers and all(isinstance(s, Server) for s in servers):
                return event, servers, run_input
        return event, self.inventory.select(servers), run_input

    # -- one execution, on the loop

    async def _execute(
        self,
        execution_id: str,
        event: Event,
        targets: list[Server],
        run_input: Any,
        keep_going: bool,
        callbacks: Callbacks,
        api: bool,
    ) -> ExecutionResult:
        payload = self.payloads.prepare(event)
        self.store.start_execution(
            execution_id,
            event.name,
            [s.name for s in targets],
            event_id=payload.event_id,
            payload_version=payload.version,
            options={"timeout": event.timeout, "type": event.type, "continue_on_failure": keep_going, "api": api},
        )
        state = _Execution(
            execution_id, event, payload, run_input, callbacks, LogBuffer(self.store), api, self.max_log_bytes
        )
        for server in targets:
            state.results[server.name] = ServerResult(server.name)
        limit = asyncio.Semaphore(self.concurrency)
        flusher = asyncio.ensure_future(self._flush_logs(state))
        tasks = {asyncio.ensure_future(self._run_server(state, server, limit)): server.name for server in targets}
        cancelled = False
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = any(task.result().status != Status.SUCCESS for task in done)
                if failed and not keep_going and pending:
                    for task in pending:
                        task.cancel()
        except asyncio.CancelledError:
            cancelled = True
            uncancel()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        finally:
            flusher.cancel()
            state.log.flush()
        status = overall_status(list(state.results.values()), cancelled=cancelled)
        self.store.finish_execution(execution_id, status)
        self._metrics.executions[status.value] += 1
        return ExecutionResult(execution_id, event.name, status, state.results, self.store)

    async def _flush_logs(self, state: _Execution) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL_S)
            state.log.flush()

    async def _run_server(self, state: _Execution, server: Server, limit: asyncio.Semaphore) -> ServerResult:
        result = state.results[server.name]
        started = time.monotonic()
        try:
            async with limit:
                result.status = Status.RUNNING
                state.status(result, "connect")
                await self._connect_deploy_run(state, server, result)
        except asyncio.CancelledError:
            uncancel()
            result.status, result.error = Status.CANCELLED, result.error or "cancelled"
        except (ConnectError, DeployError, RunnerUnavailable, SetupStalled) as error:
            result.status, result.error = Status.FAILED, str(error)
        except (asyncssh.Error, OSError) as error:
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            result.status, result.error = Status.FAILED, f"connection to {server.address} failed: {reason}"
        except Exception as error:  # a bug here must not take the other servers down
            result.status, result.error = Status.FAILED, f"internal error: {type(error).__name__}: {error}"
        if result.error:
            result.error = state.redactor.text(result.error)
        state.truncation_marker(server.name)
        result.duration_s = time.monotonic() - started
        self._metrics.record_server(result)
        self.store.update_server(
            state.execution_id, server.name, **{name: getattr(result, name) for name in SERVER_RESULT_FIELDS}
        )
        state.status(result)
        return result

    async def _connect_deploy_run(self, state: _Execution, server: Server, result: ServerResult) -> None:
        clock = time.monotonic()
        deadline = SetupDeadline(state.event)
        async with self.pool.lease(server, deadline.bound) as pooled:
            result.phases["connect"] = time.monotonic() - clock
            clock = time.monotonic()
            state.status(result, "deploy")
            result.arch = (await deadline.bound(self.sessions.probe(pooled, server), "probe")).machine

            def deploy_failed(attempt: int, reason: str) -> None:
                if state.callbacks.on_deploy_failed is not None:
                    state.callbacks.on_deploy_failed(server.name, attempt, reason)

            async def deploy(force: bool) -> Any:
                try:
                    outcome = await self.deployer.ensure(pooled, force=force, on_attempt_failed=deploy_failed)
                except DeployError:
                    self._metrics.deployments["failed"] += 1
                    raise
                self._metrics.deployments[outcome.state] += 1
                self._metrics.bytes_deployed += outcome.bytes_sent
                result.deploy = outcome.state
                result.attempts += outcome.attempts
                return outcome

            outcome = await deadline.bound(deploy(force=False), "deploy")
            result.phases["deploy"] = time.monotonic() - clock
            variables = self.store.get_variables(self.variable_scope)
            context = {
                "execution_id": state.execution_id,
                "server": server.name,
                "input": state.input,
                "variables": variables,
                "env": dict(state.event.secrets),
                "event": {"id": state.payload.event_id, "payload_version": state.payload.version},
            }
            api_run = await deadline.bound(self._open_api(state, server, pooled, result, context, variables), "api")
            state.status(result, "run")
            try:
                try:
                    run = await self._run_payload(state, server, pooled, outcome.build, context, deadline)
                except RunnerUnavailable:
                    # Missing, broken or replaced on the server although we had it as good:
                    # deploy again, once.
                    self.deployer.invalidate(pooled.key, outcome.build)
                    clock = time.monotonic()
                    outcome = await deadline.bound(deploy(force=True), "deploy")
                    result.phases["deploy"] += time.monotonic() - clock
                    run = await self._run_payload(state, server, pooled, outcome.build, context, deadline)
            finally:
                if api_run is not None:
                    self._runtime.unregister(state.execution_id, server.name)
                    await api_forward.release(pooled)
            result.phases.update(run.phases)
        self._apply_run(state, server, result, run, seeded=variables)
        if api_run is not None and run.result is not None:
            if api_run.output_set:
                result.outputs = state.redactor.value(api_run.output)
            result.variables = state.redactor.value(dict(api_run.variables))

    async def _run_payload(
        self,
        state: _Execution,
        server: Server,
        pooled: PooledConnection,
        build: RunnerBuild,
        context: dict[str, Any],
        deadline: SetupDeadline,
    ) -> RunOutcome:
        """Run on the connection's idle runner session, or on a new one; keep it for the next run."""
        clock = time.monotonic()
        session = await deadline.bound(self.sessions.take(pooled, build), "start")
        starting = time.monotonic() - clock
        run = RemoteRun(
            session,
            context,
            state.payload.data,
            state.payload.sha256,
            timeout=state.event.timeout,
            grace=state.event.grace_period,
            on_lines=functools.partial(state.lines, server.name),
            redactor=state.redactor,
        )
        try:
            outcome = await run.run()
        finally:
            await self.sessions.give_back(pooled, session, run.reusable)
        outcome.phases["upload"] += starting  # opening a session, when none was idle
        return outcome

    async def _open_api(
        self,
        state: _Execution,
        server: Server,
        pooled: Any,
        result: ServerResult,
        context: dict[str, Any],
        variables: dict[str, Any],
    ) -> ApiRun | None:
        """API mode: make sure the runtime service and this connection's forward are up, register
        the run and put its endpoint and token into the context; else fall back to bundled."""
        if not state.api:
            result.helpers = "bundled"
            return None
        service_path = await self._runtime.start()
        home = getattr(pooled.info, "home", None)
        if not home:
            result.helpers = "bundled (API unavailable: the server did not say where its home directory is)"
            return None
        try:
            socket_path = await api_forward.acquire(pooled, home, service_path)
        except api_forward.ForwardRefused as error:
            result.helpers = f"bundled (API unavailable: the server refused the forward: {error})"
            return None

        def variable_set(name: str, value: Any) -> None:
            name, value = state.redactor.text(name), state.redactor.value(value)
            updated_by = f"{state.execution_id}/{server.name}"
            self.store.set_variable(self.variable_scope, name, value, updated_by=updated_by)
            if state.callbacks.on_variable is not None:
                state.callbacks.on_variable(server.name, name, value)

        def tool_called(tool: str, arguments: Any, started: float, duration_s: float, error: str | None) -> None:
            holds_secret = state.redactor.value(arguments) != arguments
            self.store.record_tool_call(
                state.execution_id,
                server.name,
                state.redactor.text(tool),
                started_at=started,
                duration_s=duration_s,
                error=None if error is None else state.redactor.text(error),
                arguments=None if holds_secret else json.dumps(arguments),  # never a secret in the store
            )

        api_run = ApiRun(
            state.execution_id,
            server.name,
            state.event.name,
            state.input,
            dict(variables),
            on_variable=variable_set,
            on_tool_call=tool_called,
        )
        token = self._runtime.register(api_run, state.event.timeout)
        context["api"] = {"socket": socket_path, "token": token}
        result.helpers = "api"
        return api_run

    def _apply_run(
        self, state: _Execution, server: Server, result: ServerResult, run: RunOutcome, seeded: dict[str, Any]
    ) -> None:
        report = run.result
        if run.cancelled:
            result.status, result.error = Status.CANCELLED, run.error or "cancelled"
        elif run.timed_out or (report and report.get("timed_out")):
            result.status = Status.TIMEOUT
            result.error = run.error or f"timed out after {state.event.timeout:g} s"
        elif report is None:
            result.status = Status.FAILED
            result.error = run.error or "connection lost during the run (no result from the runner)"
        elif report.get("runner_error"):
            result.status, result.error = Status.FAILED, report["runner_error"]["message"]
        else:
            code = report.get("exit_code")
            result.status = Status.SUCCESS if code == 0 else Status.FAILED
            result.error = None if code == 0 else f"exit code {code}"
        if report is not None:
            result.exit_code = report.get("exit_code")
            result.outputs = state.redactor.value(report.get("outputs"))
            result.variables = state.redactor.value(report.get("variables") or {})
            # Only what this run changed: rewriting the values it was given could undo what a
            # concurrent run set meanwhile (API mode stores its changes live, as they happen).
            for name, value in result.variables.items():
                if name in seeded and seeded[name] == value:
                    continue
                refused = variable_too_deep(name, value)
                if refused:
                    result.status, result.error = Status.FAILED, f"{refused}: not stored"
                    continue
                self.store.set_variable(
                    self.variable_scope, name, value, updated_by=f"{state.execution_id}/{server.name}"
                )
