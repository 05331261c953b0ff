"""Detached runs: executions that go on on their servers without the process that started them.

``Executor.submit(event, servers, detach=True)`` hands each server's run to a keeper process
on that server (``runner/PROTOCOL.md``, "Detached runs"): the script's output goes to a bounded
spool in a private job dir there, and the submitting process follows it live as it follows any
run. When that process dies or loses its connection, the runs go on, each under its own
timeout; the store keeps the execution as ``detached``. ``Executor.attach(execution_id)``, from
any process on the same state dir, follows them again: each server's whole spool from the
start (the stored lines of those servers are replaced, so every line is there once, in
order), then live, up to the result, which it stores; then the server's job dir is released
(removed). ``Executor.detached()`` lists detached executions with each server's live state;
``Executor.cancel_detached(execution_id)`` stops them.

This module owns the orchestrator's side of that: job names, the detach and attach requests
on a runner session (:class:`DetachedRun`), one server's detached run
(:class:`DetachServerRun`) and its follow-up (:class:`FollowServerRun`), the release, the
listing, and the attach flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from cronium_nb.errors import CroniumError, RunnerUnavailable
from cronium_nb.execution import Callbacks, Execution
from cronium_nb.model import Event, Server, Status
from cronium_nb.payload import PreparedPayload
from cronium_nb.results import ExecutionResult, ServerResult, overall_status
from cronium_nb.server_run import RunParts, ServerRun, SetupDeadline
from cronium_nb.ssh.pool import PooledConnection
from cronium_nb.ssh.remote_run import RemoteRun, RunnerSession, RunOutcome
from cronium_nb.store import SERVER_RESULT_FIELDS, Store
from cronium_nb.store_worker import StoreWorker

if TYPE_CHECKING:
    from cronium_nb.ssh.deploy import RunnerBuild

DEFAULT_SPOOL_BYTES = 64 * 2**20  # a detached run's output kept on its server (the rest is counted)
MAX_SPOOL_BYTES = 4 * 2**30  # the runner's limit (runner/PROTOCOL.md, "Detached runs")
# The server enforces a detached run's timeout; here it only bounds the wait for a runner that
# hangs. Following may lag behind the run (a whole spool sent again, a slow store), so the
# orchestrator waits this much longer than the timeout before it asks for a stop itself.
FOLLOW_MARGIN_S = 300.0
REPLY_TIMEOUT_S = 30.0  # a release or jobs request answers at once; a session that does not is lost
LISTING_TIMEOUT_S = 60.0  # ex.detached(): connect, probe and deploy, per server
EXECUTION_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
FINAL = {status.value for status in Status if status.finished}


class DetachedError(CroniumError, ValueError):
    """``attach`` or ``cancel_detached`` asked about an execution that is not a detached one of
    this store, or that another live process follows now, or a detached run's spool limit is not
    one the runner takes; raised before anything is sent."""


def check_spool_bytes(value: object) -> None:
    """``Executor.detached_spool_bytes`` must be a whole number of bytes the runner accepts."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SPOOL_BYTES:
        raise DetachedError(
            f"detached_spool_bytes must be a whole number of bytes, 1 to {MAX_SPOOL_BYTES}, got {value!r}"
        )


def job_name(execution_id: str, server: str) -> str:
    """The server-side job of ``server``'s part of the execution (a file name: the server name,
    which the inventory chooses, only as a digest)."""
    return f"{execution_id}-{hashlib.sha256(server.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class DetachSettings:
    """How an execution's detached runs are started and followed."""

    spool_bytes: int = DEFAULT_SPOOL_BYTES
    leaving: Callable[[], bool] = lambda: False  # True: a cancel means "stop following", not "stop"
    started_at: float | None = None  # the execution's start (attach: what is left of its timeout)
    cancel: bool = False  # attach only to stop it (cancel_detached)


@dataclass
class DetachedOutcome(RunOutcome):
    left: bool = False  # this process stopped following; the run goes on


class DetachedRun(RemoteRun):
    """A detach or attach request on a runner session, followed up to the run's result. The
    session says ``detached`` or ``attached``, then relays the run's spooled frames; a stop (cancel
    or timeout) goes to the run as a control line, unless this process is leaving (``leaving``):
    then it only stops following."""

    def __init__(
        self,
        session: RunnerSession,
        request: dict[str, Any],
        payload: bytes,
        *,
        leaving: Callable[[], bool],
        **options: Any,
    ) -> None:
        super().__init__(session, {}, payload, "", **options)
        self.request = request
        self._outcome: DetachedOutcome = DetachedOutcome(result=None)
        self._leaving = leaving

    def message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("detached", "attached"):
            return
        if kind == "spool_dropped":
            for stream, splitter in self._splitters.items():  # the cut-off line before the marker
                rest = splitter.flush()
                self._emit(stream, b"\n".join(rest), len(rest), time.time())
            lines, size, limit = (int(message.get(key) or 0) for key in ("lines", "bytes", "limit"))
            text = (
                f"[cronium] output dropped on the server: {lines} lines ({size / 2**20:.1f} MiB) past the "
                f"detached run's spool limit of {_size(limit)} (Executor.detached_spool_bytes)"
            )
            self.on_lines("cronium", text, 1, time.time())
            return
        super().message(message)

    async def _stop(self, reason: str) -> None:
        if reason == "cancel" and self._leaving():
            self._outcome.left, self._outcome.cancelled = True, False
            return
        await super()._stop(reason)


def _size(n: int) -> str:
    """A byte count in MiB, or KiB under one MiB."""
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


class _Reply:
    """Waits for one message of a type on a session (release, jobs)."""

    room = None

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def message(self, message: dict[str, Any]) -> None:
        if message.get("type") == self.kind and not self.future.done():
            self.future.set_result(message)

    def stream(self, frame: object) -> None:
        pass

    def session_ended(self) -> None:
        if not self.future.done():
            self.future.set_exception(RunnerUnavailable(f"the runner session ended before its {self.kind} reply"))


async def ask(session: RunnerSession, request: dict[str, Any], reply: str) -> dict[str, Any]:
    """Send ``request`` on an idle session and return its ``reply`` message."""
    waiting = _Reply(reply)
    session.attach(cast(RemoteRun, waiting))
    try:
        if not session.alive:
            waiting.session_ended()
        session.send(json.dumps(request).encode() + b"\n")
        return await asyncio.wait_for(waiting.future, REPLY_TIMEOUT_S)
    finally:
        session.attach(None)


class DetachServerRun(ServerRun):
    """One server's detached run: a ``detach`` request instead of ``run``, followed like a run.
    Once its result is stored the server's job dir is released; a run whose result did not come
    (this process left, or lost contact) is ``detached``, for ``attach`` to follow."""

    def __init__(self, execution: Execution, server: Server, parts: RunParts, settings: DetachSettings) -> None:
        super().__init__(execution, server, parts)
        self.settings = settings
        self.job = job_name(execution.execution_id, server.name)

    async def _run_payload(
        self, pooled: PooledConnection, build: RunnerBuild, context: dict[str, Any], deadline: SetupDeadline
    ) -> RunOutcome:
        payload = self.execution.payload
        request = {
            **context,
            "op": "detach",
            "job": self.job,
            "sha256": payload.sha256,
            "payload_size": len(payload.data),
            "spool_max_bytes": self.settings.spool_bytes,
        }
        return await self._follow(pooled, build, deadline, request, payload.data, self.execution.event.timeout, context)

    async def _follow(
        self,
        pooled: PooledConnection,
        build: RunnerBuild,
        deadline: SetupDeadline,
        request: dict[str, Any],
        payload: bytes,
        timeout: float,
        context: dict[str, Any],
    ) -> RunOutcome:
        execution = self.execution

        def detached_run(session: RunnerSession) -> DetachedRun:
            return DetachedRun(
                session,
                request,
                payload,
                leaving=self.settings.leaving,
                timeout=timeout + FOLLOW_MARGIN_S,
                grace=execution.event.grace_period,
                on_lines=lambda stream, text, count, ts: execution.lines(self.server.name, stream, text, count, ts),
                redactor=execution.redactor,
                room=execution.room_for_output,
            )

        async def store_and_release(session: RunnerSession, outcome: RunOutcome) -> None:
            if outcome.result is not None:
                await self._store_and_release(session, outcome, context.get("variables") or {})

        return await self._on_session(pooled, build, deadline, detached_run, store_and_release)

    async def _store_and_release(self, session: RunnerSession, outcome: RunOutcome, seeded: dict[str, Any]) -> None:
        """The result into the store (waited for, after this server's lines), then the job dir on
        the server removed: a process killed in between leaves the job, never loses the result."""
        self._apply(outcome, seeded)
        execution, worker = self.execution, self.parts.store
        execution.log.flush()
        fields = {name: getattr(self.result, name) for name in SERVER_RESULT_FIELDS}
        await worker.call(worker.store.update_server, execution.execution_id, self.server.name, **fields)
        # Not released (the session went): left on the server, swept there a week after the run ended.
        with contextlib.suppress(RunnerUnavailable, asyncio.TimeoutError):
            await ask(session, {"op": "release", "job": self.job}, "released")

    def _apply(self, run: RunOutcome, seeded: dict[str, Any]) -> None:
        report = run.result
        if report is None and not run.cancelled and not run.timed_out:
            left = isinstance(run, DetachedOutcome) and run.left
            why = "this process stopped following it" if left else (run.error or "contact lost")
            self.result.status, self.result.error_kind = Status.DETACHED, None
            self.result.error = (
                f"goes on on the server, followed by no one ({why}): "
                f"ex.attach({self.execution.execution_id!r}) follows it"
            )
            return
        if report is not None and report.get("stop_reason") == "cancel":
            run.cancelled = True  # by this process, or by another one's cancel_detached
            run.error = run.error or "cancelled"
        super()._apply(run, seeded)


class FollowServerRun(DetachServerRun):
    """``attach``: follows one server's detached run again, from the start of its spool."""

    async def _connect_deploy_run(self) -> None:
        parts, result, execution = self.parts, self.result, self.execution
        result.helpers = "bundled"
        clock = time.monotonic()
        deadline = SetupDeadline(execution.event)
        async with parts.pool.lease(self.server, deadline.bound, retry_until=deadline.at) as pooled:
            result.phases["connect"] = time.monotonic() - clock
            clock = time.monotonic()
            execution.status(result, "deploy")
            info = await deadline.bound(parts.sessions.probe(pooled, self.server), "probe")
            result.arch = info.machine
            outcome = await deadline.bound(self._deploy(pooled, force=False), "deploy")
            result.phases["deploy"] = time.monotonic() - clock
            seeded = await parts.store.call(parts.store.store.get_variables, execution.variable_scope)
            execution.status(result, "run")
            request = {"op": "attach", "job": self.job}
            # cancel_detached: the stop follows the request at once (the session passes it on)
            stop = b'{"op": "stop", "reason": "cancel"}\n' if self.settings.cancel else b""
            elapsed = time.time() - (self.settings.started_at or time.time())
            left = max(0.0, execution.event.timeout - elapsed) + execution.event.grace_period
            context = {"variables": seeded}
            try:
                run = await self._follow(pooled, outcome.build, deadline, request, stop, left, context)
            except RunnerUnavailable:  # the runner changed on the server meanwhile: deploy again, once
                parts.deployer.invalidate(pooled.key, outcome.build)
                outcome = await deadline.bound(self._deploy(pooled, force=True), "deploy")
                run = await self._follow(pooled, outcome.build, deadline, request, stop, left, context)
            result.phases.update(run.phases)
        self._apply(run, seeded)


async def settle(result: ExecutionResult, store: StoreWorker) -> ExecutionResult:
    """A detached execution after its servers' runs: ``detached`` while any server's run goes on
    unfollowed (the store's record says so, with no end time); ``cancelled`` when runs were
    stopped and none failed (a stop by ``cancel_detached`` reaches the servers as a result)."""
    statuses = [r.status for r in result.servers.values()]
    waiting = [r.server for r in result.servers.values() if r.status == Status.DETACHED]
    if not waiting:
        cancelled = Status.CANCELLED in statuses and set(statuses) <= {Status.SUCCESS, Status.CANCELLED}
        if cancelled and result.status != Status.CANCELLED:  # stopped on the servers, by cancel_detached
            await store.call(store.store.finish_execution, result.execution_id, Status.CANCELLED)
            servers = result.servers
            return ExecutionResult(result.execution_id, result.event_name, Status.CANCELLED, servers, store.store)
        return result
    error = f"goes on unfollowed on {', '.join(waiting)}: ex.attach({result.execution_id!r}) follows it"
    await store.call(store.store.mark_detached, result.execution_id, error)
    return ExecutionResult(
        result.execution_id, result.event_name, Status.DETACHED, result.servers, store.store, error=error
    )


# -- attach


@dataclass
class AttachPlan:
    """What ``attach`` follows, checked before anything is sent."""

    execution_id: str
    event: Event  # a stand-in with the stored name, type, timeout and grace, and any secrets given
    targets: list[Server]  # every server of the execution
    follow: set[str]  # those whose run has no stored result yet
    stored: dict[str, ServerResult]  # the others, as stored
    started_at: float
    payload: PreparedPayload


def plan_attach(
    store: Store, execution_id: str, secrets: dict[str, str] | None, select: Callable[[list[str]], list[Server]]
) -> AttachPlan:
    """Check an attach request against the store and the inventory (``select``)."""
    if not isinstance(execution_id, str) or not EXECUTION_ID.match(execution_id):
        raise DetachedError(f"not an execution id: {execution_id!r}")
    row = store.execution_row(execution_id)
    if row is None:
        raise DetachedError(f"no execution {execution_id!r} in this store ({store.path})")
    options = row["options"]
    if not options.get("detach"):
        raise DetachedError(
            f"execution {execution_id!r} was not detached: only runs of submit(..., detach=True) can be attached"
        )
    given = dict(secrets or {})  # the keeper redacted them already; these are redacted here too
    targets = select(list(row["targets"]))
    if follower := store.live_follower(execution_id):
        raise _followed_elsewhere(execution_id, follower)
    frame = store.server_results(execution_id)
    stored: dict[str, ServerResult] = {}
    follow: set[str] = set()
    for record in frame.to_dict("records"):
        if record["status"] in FINAL:
            stored[record["server"]] = _server_result({str(key): value for key, value in record.items()})
        else:
            follow.add(record["server"])
    event = Event(
        name=row["event_name"],
        script=":",
        type=options.get("type", "bash"),
        timeout=float(options.get("timeout") or 3600),
        grace_period=float(options.get("grace_period") or 5),
        secrets=given,
    )
    payload = PreparedPayload(row["event_id"] or 0, row["payload_version"] or 0, "", Path(), b"", "attach")
    return AttachPlan(execution_id, event, targets, follow, stored, row["started_at"], payload)


def _followed_elsewhere(execution_id: str, follower: str) -> DetachedError:
    host, _, rest = follower.partition(":")
    return DetachedError(
        f"execution {execution_id!r} is followed by another process now (pid {rest.partition(':')[0]} on {host}): "
        "attach it once that process stopped following (ex.stop_following(job), or it ended)"
    )


def _server_result(record: dict[str, Any]) -> ServerResult:
    def value(name: str) -> Any:
        item = record.get(name)
        return None if isinstance(item, float) and item != item else item  # NaN: SQL NULL

    result = ServerResult(record["server"], status=Status(record["status"]))
    for name in ("arch", "deploy", "error", "error_kind", "outputs"):
        setattr(result, name, value(name))
    result.exit_code = None if value("exit_code") is None else int(record["exit_code"])
    result.duration_s = value("duration_s")
    result.attempts = int(value("attempts") or 0)
    result.variables = value("variables") or {}
    result.phases = value("phases") or {}
    return result


async def attach(
    plan: AttachPlan,
    parts: RunParts,
    *,
    callbacks: Callbacks,
    variable_scope: str,
    max_log_bytes: int,
    concurrency: int,
    settings: DetachSettings,
) -> ExecutionResult:
    """Follow the plan's servers to their results (on the executor's loop), store them, and
    complete the execution's record."""
    worker = parts.store
    follower = await worker.call(worker.store.adopt_execution, plan.execution_id, sorted(plan.follow))
    if follower:  # it began following since plan_attach looked
        raise _followed_elsewhere(plan.execution_id, follower)
    execution = Execution(
        plan.execution_id, plan.event, plan.payload, None, callbacks, worker, False, variable_scope, max_log_bytes
    )

    def run_server(server: Server, limit: asyncio.Semaphore) -> Coroutine[Any, Any, ServerResult]:
        if server.name in plan.follow:
            return FollowServerRun(execution, server, parts, settings).run(limit)
        return _stored(execution, plan.stored[server.name])

    result = await execution.run(plan.targets, run_server, concurrency=concurrency, keep_going=True)
    return await settle(result, worker)


async def _stored(execution: Execution, stored: ServerResult) -> ServerResult:
    """A server whose result was stored before this attach: as it is."""
    execution.results[stored.server] = stored
    execution.status(stored)
    return stored


def stored_result(store: Store, plan: AttachPlan) -> ExecutionResult:
    """``attach`` of an execution with nothing left to follow: what the store has."""
    servers = {server.name: plan.stored[server.name] for server in plan.targets if server.name in plan.stored}
    status = overall_status(list(servers.values()), cancelled=False)
    return ExecutionResult(plan.execution_id, plan.event.name, status, servers, store)


# -- listing


async def server_jobs(parts: RunParts, server: Server) -> dict[str, dict[str, Any]]:
    """The detached jobs on ``server`` by job name (the runner's ``jobs`` request)."""
    listing = Event(name="detached-jobs", script=":", timeout=LISTING_TIMEOUT_S)
    deadline = SetupDeadline(listing)
    async with parts.pool.lease(server, deadline.bound, retry_until=deadline.at) as pooled:
        await deadline.bound(parts.sessions.probe(pooled, server), "probe")
        daemon_args = functools.partial(parts.sessions.daemon_args, pooled)
        outcome = await deadline.bound(parts.deployer.ensure(pooled, daemon_args=daemon_args), "deploy")
        session = await deadline.bound(parts.sessions.take(pooled, outcome.build), "start")
        reusable = False
        try:
            reply = await ask(session, {"op": "jobs"}, "jobs")
            reusable = True
        finally:
            await parts.sessions.give_back(pooled, session, reusable)
    return {job["job"]: job for job in reply.get("jobs") or []}


DETACHED_COLUMNS = (
    "execution_id", "event", "server", "state", "started_at", "finished_at", "exit_code", "stop_reason",
    "spool_bytes", "pid", "error",
)  # fmt: skip


async def listing(parts: RunParts, executions: Sequence[dict[str, Any]], servers: dict[str, Server]) -> pd.DataFrame:
    """One row per server of each detached execution whose result is not stored yet, with its
    run's state on the server: running, finished (its result waits there for attach), lost (its
    keeper is gone without a result), gone (no job there), or unknown (with the error)."""
    wanted = sorted({name for row in executions for name in row["follow"]})
    found: dict[str, dict[str, dict[str, Any]] | BaseException] = {}

    async def query(name: str) -> None:
        if name not in servers:
            found[name] = CroniumError(f"server {name!r} is not in this executor's inventory")
            return
        try:
            found[name] = await server_jobs(parts, servers[name])
        except Exception as error:  # one server's failure is its rows' error
            found[name] = error

    await asyncio.gather(*(query(name) for name in wanted))
    rows = []
    for row in executions:
        for name in row["follow"]:
            jobs = found[name]
            record: dict[str, Any] = {"execution_id": row["id"], "event": row["event_name"], "server": name}
            if isinstance(jobs, BaseException):
                record.update(state="unknown", error=str(jobs) or type(jobs).__name__)
            else:
                job = jobs.get(job_name(row["id"], name))
                if job is None:
                    record.update(state="gone", error="no job on the server (fetched, expired, or never started)")
                else:
                    result = job.get("result") or {}
                    record.update(
                        state=job.get("state"),
                        started_at=job.get("started_at"),
                        finished_at=job.get("finished_at") or None,
                        exit_code=result.get("exit_code"),
                        stop_reason=result.get("stop_reason"),
                        spool_bytes=job.get("spool_bytes"),
                        pid=job.get("pid"),
                        error=(result.get("runner_error") or {}).get("message"),
                    )
            rows.append(record)
    frame = pd.DataFrame(rows, columns=list(DETACHED_COLUMNS))
    for column in ("started_at", "finished_at"):
        frame[column] = pd.to_datetime(frame[column], unit="s", utc=True)
    return frame


def pending_executions(store: Store) -> list[dict[str, Any]]:
    """The detached executions of ``store`` not completed, each with the servers to follow."""
    executions = []
    for execution_id in store.detached_executions():
        row = store.execution_row(execution_id)
        if row is None:  # deleted meanwhile
            continue
        frame = store.server_results(execution_id)
        row["follow"] = [r["server"] for r in frame.to_dict("records") if r["status"] not in FINAL]
        executions.append(row)
    return executions
