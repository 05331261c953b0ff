"""The executor: runs an event on many servers at once and gives back an ExecutionResult.

This module is the front: it checks what it is asked before anything runs, and owns the parts a
run needs (the store and its worker thread, the connection pool, the deployer, the runner
sessions, the API forwards and runtime service, the metrics) and the loop thread they live on.
An execution's fan-out is :class:`~cronium_nb.execution.Execution`; one server's way from
connecting to its stored result is :class:`~cronium_nb.server_run.ServerRun`. The public API has
sync and async twins::

    ex = Executor(inventory=inv)
    res = ex.run(event, servers="web")            # blocks; Ctrl-C cancels the remote work
    job = ex.submit(event, servers="all")         # a Job (a concurrent.futures.Future) at once
    res = await ex.run_async(event, servers=[...])
    ex.put("app.tar", "/srv/app.tar", servers="web")   # files: a DataFrame, see cronium_nb.transfer
    ex.fetch("/var/log/syslog", servers="web", dest="logs/")

``Executor(inventory, cluster=client)`` (a ``distributed.Client``) runs the servers on the Dask
cluster's workers instead of this process (see :mod:`cronium_nb.cluster`); the API is the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from cronium_nb import detached as detached_runs
from cronium_nb import resources
from cronium_nb.become import BecomeAuth, BecomePasswordSource, become_user
from cronium_nb.config import state_dir as resolve_state_dir
from cronium_nb.execution import DEFAULT_MAX_LOG_BYTES, Callbacks, Execution
from cronium_nb.inventory import Inventory
from cronium_nb.jobs import Job, LoopThread, LoopWork
from cronium_nb.metrics import Metrics
from cronium_nb.model import Event, EventError, Server, check_input
from cronium_nb.payload import PayloadService, PreparedPayload
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.rollout import DEFAULT_CONFIRM_ABOVE, Plan, Rollout, make_plan
from cronium_nb.runtime_api import RuntimeService
from cronium_nb.server_run import RunParts, ServerRun
from cronium_nb.ssh.api_forward import ApiForwards
from cronium_nb.ssh.deploy import DEFAULT_BACKOFF_S, Deployer, RunnerBuilds
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.pool import ConnectionPool
from cronium_nb.ssh.remote_run import uncancel, uninterrupted
from cronium_nb.ssh.sessions import RunnerSessions
from cronium_nb.store import Store
from cronium_nb.store_worker import StoreWorker
from cronium_nb.tools import ToolRegistry
from cronium_nb.transfer import Progress, TransferJob, Transfers, start_fetch, start_put
from cronium_nb.views import HistoryFrame, MetricsFrame

if TYPE_CHECKING:
    from cronium_nb.cluster.dispatch import ClusterDispatch

__all__ = ["DEFAULT_CONCURRENCY", "Callbacks", "Executor", "Job"]

ResultT = TypeVar("ResultT")

DEFAULT_CONCURRENCY = 32
CLOSE_WAIT_S = 60.0  # close(): how long running executions get to stop and be recorded
_UNSET: Any = object()  # `input` not given: the event's own input


class Executor:
    """Runs events on servers over SSH. See the module docstring for the API.

    ``deploy_attempts`` and ``deploy_backoff`` (seconds before each retry) govern runner
    deployment; ``concurrency`` bounds servers worked on at once; ``continue_on_failure=False``
    cancels the other servers at the first failure; ``max_log_bytes`` bounds the output text
    stored per execution (1 GiB): past it lines are counted, not stored, and each server's log
    ends with a ``cronium`` stream line saying how much was dropped. ``confirm_above``: a
    ``%%cronium`` cell aimed at more servers than this asks for confirmation (``--yes`` skips it).
    ``detached_spool_bytes`` bounds the output a detached run keeps on its server (64 MiB).
    ``become_password`` (or a callable returning it) is for servers whose sudo asks for one when
    an event runs with ``become``; without it the executor asks once, when a server first needs it
    (:mod:`cronium_nb.become`).
    """

    detached_spool_bytes: int = detached_runs.DEFAULT_SPOOL_BYTES

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
        confirm_above: int = DEFAULT_CONFIRM_ABOVE,
        cluster: Any = None,
        become_password: BecomePasswordSource = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_log_bytes < 0:
            raise ValueError("max_log_bytes must be 0 or more")
        if isinstance(confirm_above, bool) or not isinstance(confirm_above, int) or confirm_above < 0:
            raise ValueError(f"confirm_above must be a whole number of servers, 0 or more, got {confirm_above!r}")
        self.max_log_bytes = max_log_bytes
        self.confirm_above = confirm_above  # a %%cronium cell aimed at more servers asks first
        self.inventory = inventory or Inventory()
        self.state_dir = resolve_state_dir(state_dir)
        self.ssh_options = ssh_options or SSHOptions()
        self.concurrency = concurrency
        self.continue_on_failure = continue_on_failure
        self.variable_scope = variable_scope
        deploy_backoff = tuple(deploy_backoff)
        self._cluster: ClusterDispatch | None = None  # first: a wrong `cluster` is refused before anything opens
        if cluster is not None:
            self._cluster = _cluster_dispatch(cluster, self, runner_dist, deploy_attempts, deploy_backoff)
        self.store = Store(self.state_dir)
        self.tools = ToolRegistry()
        self._store_worker = StoreWorker(self.store)
        self._payloads = PayloadService(self.store, self.state_dir)
        self._metrics = Metrics()
        self._runtime = RuntimeService(self.tools)
        # the installed package's runner builds, or the checkout's runner/dist (`make runner`)
        builds = RunnerBuilds(Path(runner_dist) if runner_dist else resources.runner_dist())
        deployer = Deployer(builds, backoff=tuple(deploy_backoff), attempts=deploy_attempts)
        sessions = RunnerSessions(deployer, self.ssh_options, self._store_worker)
        accept_new = self.ssh_options.accept_new_known_hosts or self.state_dir / "known_hosts"
        self._loop_thread = LoopThread()
        self.pool: ConnectionPool = self._loop_thread.call(self._make_pool(accept_new, sessions))
        self._parts = RunParts(
            self.pool,
            deployer,
            sessions,
            ApiForwards(),
            self._runtime,
            self._store_worker,
            self._metrics,
            BecomeAuth(become_password),
        )
        self._transfers = Transfers(self.pool, concurrency, self._store_worker)
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # not finished yet, or not collected
        self._transfer_jobs: weakref.WeakSet[TransferJob] = weakref.WeakSet()  # the same, for put/fetch
        self._leaving: set[str] = set()  # detached executions this process stops following
        self._closed = False

    async def _make_pool(self, accept_new: Path, sessions: RunnerSessions) -> ConnectionPool:
        return ConnectionPool(self.ssh_options, accept_new, keeper=sessions, servers=lambda: self.inventory.servers)

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
        batch_size: int | None = None,
        max_fail: int | float | None = None,
        detach: bool = False,
    ) -> Job:
        """Start running ``event`` and return a :class:`Job` at once (also from a callback).

        Everything is checked before anything is sent: unknown servers or groups, the event, the
        input and the timeout raise here. ``api=True`` gives the script's helpers a live line to
        this process (variables set on the server are seen here at once, see ``on_variable``);
        where the SSH forward cannot be opened the run falls back to bundled mode and says so.
        ``batch_size`` and ``max_fail`` make it a rollout (see :mod:`cronium_nb.rollout`): the
        servers go ``batch_size`` at a time, in order, and once more than ``max_fail`` (a count,
        or a fraction of the servers) did not succeed, the batches not started are skipped.
        ``detach=True`` hands each server's run to a keeper process there, so that it goes on
        when this process dies or loses its connection (see :mod:`cronium_nb.detached`).
        """
        self._check_open()
        event, targets, run_input = self._validate(event, servers, input, timeout)
        rollout = Rollout(batch_size, max_fail)
        if detach:
            if api:
                raise EventError(
                    "api=True needs this process to answer the script's helpers: a detached run cannot use it"
                )
            if rollout.batch_size is not None:
                raise EventError("a rollout needs this process to start each next batch: a detached run cannot be one")
            if self._cluster is not None:
                raise EventError("a detached run goes through this process's connections, not a Dask cluster")
            if any(become_user(event, server) is not None for server in targets):
                raise EventError(
                    "a detached run cannot use become yet (sudo's password would have to wait on the server)"
                )
            detached_runs.check_spool_bytes(self.detached_spool_bytes)
        placement = self._place(targets, api, rollout)
        keep_going = self.continue_on_failure if continue_on_failure is None else continue_on_failure
        return self._start(
            event, targets, run_input, keep_going, callbacks or Callbacks(), api, rollout, placement, detach=detach
        )

    def _place(self, targets: list[Server], api: bool, rollout: Rollout) -> dict[str, list[Server]] | None:
        """Through a Dask cluster: the worker of each server (checked before anything runs); None
        when the servers run in this process."""
        if self._cluster is None:
            return None
        if api:
            raise ValueError("api=True is not available through a Dask cluster (the tools live in this process)")
        if rollout.batch_size is not None:
            raise ValueError(
                "batch_size/max_fail are not available through a Dask cluster yet: run the batches locally"
            )
        return self._cluster.place(targets)

    def _start(
        self,
        event: Event,
        targets: list[Server],
        run_input: Any,
        keep_going: bool,
        callbacks: Callbacks,
        api: bool,
        rollout: Rollout,
        placement: dict[str, list[Server]] | None,
        retry_of: str | None = None,
        *,
        detach: bool = False,
    ) -> Job:
        execution_id = uuid.uuid4().hex[:12]
        coroutine = self._execute(
            execution_id, event, targets, run_input, keep_going, callbacks, api, rollout, placement, retry_of, detach
        )
        job = Job(execution_id, self._loop_thread, coroutine)
        job.detached = detach
        self._jobs.add(job)
        return job

    def run(
        self,
        event: Event,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        input: Any = _UNSET,
        timeout: float | None = None,
        continue_on_failure: bool | None = None,
        callbacks: Callbacks | None = None,
        api: bool = False,
        batch_size: int | None = None,
        max_fail: int | float | None = None,
    ) -> ExecutionResult:
        """:meth:`submit` and wait. Ctrl-C (KeyboardInterrupt) cancels the remote work and returns
        the cancelled result once every server has stopped; a second Ctrl-C stops waiting."""
        if self._loop_thread.on_loop():
            raise RuntimeError("run() would wait for the executor's own loop: from a callback, use submit()")
        job = self.submit(
            event,
            servers,
            input=input,
            timeout=timeout,
            continue_on_failure=continue_on_failure,
            callbacks=callbacks,
            api=api,
            batch_size=batch_size,
            max_fail=max_fail,
        )
        return _wait(job)

    async def run_async(
        self,
        event: Event,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        input: Any = _UNSET,
        timeout: float | None = None,
        continue_on_failure: bool | None = None,
        callbacks: Callbacks | None = None,
        api: bool = False,
        batch_size: int | None = None,
        max_fail: int | float | None = None,
    ) -> ExecutionResult:
        """The awaitable twin of :meth:`run`, usable from any event loop; cancelling the awaiting
        task cancels the remote work, and waits for it to stop."""
        job = self.submit(
            event,
            servers,
            input=input,
            timeout=timeout,
            continue_on_failure=continue_on_failure,
            callbacks=callbacks,
            api=api,
            batch_size=batch_size,
            max_fail=max_fail,
        )
        return await _await(job)

    # -- files (cronium_nb.transfer): put, fetch, their submit_ and _async twins

    def submit_put(
        self,
        local: str | Path,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        mode: int | None = None,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> TransferJob:
        """Start copying the local file ``local`` to ``remote`` on every server (a directory, or
        a path ending in /, gets the file under its own name); a :class:`TransferJob` at once.
        Each server's copy is streamed, checksummed on the server, then renamed into place with
        ``mode`` (else the replaced file's mode, else 0644). ``timeout`` bounds each server's
        transfer; ``progress(server, bytes_done, total)`` is called as pieces go (on the loop)."""
        self._check_open()
        targets = self._select(servers)
        return self._track(
            start_put(
                self._transfers,
                self._loop_thread.loop,
                targets,
                local,
                remote,
                mode=mode,
                timeout=timeout,
                progress=progress,
            )
        )

    def put(
        self,
        local: str | Path,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        mode: int | None = None,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """:meth:`submit_put` and wait: a DataFrame (server, path, bytes, sha256, status, error,
        duration_s), one row per server. Ctrl-C cancels (rows ``cancelled``)."""
        return self._wait_transfer(
            lambda: self.submit_put(local, remote, servers, mode=mode, timeout=timeout, progress=progress)
        )

    async def put_async(
        self,
        local: str | Path,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        mode: int | None = None,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """The awaitable twin of :meth:`put`; cancelling the awaiting task cancels the transfer."""
        return await _await(self.submit_put(local, remote, servers, mode=mode, timeout=timeout, progress=progress))

    def submit_fetch(
        self,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        dest: str | Path,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> TransferJob:
        """Start copying ``remote`` from every server to ``dest/<server>/<basename>``; a
        :class:`TransferJob` at once. Server names and the basename must be plain file names
        (no '/', '.', '..' or NUL): anything else raises here, before anything runs."""
        self._check_open()
        targets = self._select(servers)
        return self._track(
            start_fetch(
                self._transfers, self._loop_thread.loop, targets, remote, dest=dest, timeout=timeout, progress=progress
            )
        )

    def fetch(
        self,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        dest: str | Path,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """:meth:`submit_fetch` and wait: a DataFrame like :meth:`put`'s, ``path`` the local file."""
        return self._wait_transfer(
            lambda: self.submit_fetch(remote, servers, dest=dest, timeout=timeout, progress=progress)
        )

    async def fetch_async(
        self,
        remote: str,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        dest: str | Path,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> pd.DataFrame:
        """The awaitable twin of :meth:`fetch`; cancelling the awaiting task cancels the transfer."""
        return await _await(self.submit_fetch(remote, servers, dest=dest, timeout=timeout, progress=progress))

    def _track(self, job: TransferJob) -> TransferJob:
        self._transfer_jobs.add(job)  # close() cancels it, so its temporary files are removed
        return job

    def _wait_transfer(self, start: Callable[[], TransferJob]) -> pd.DataFrame:
        """Start a transfer and wait for its table; Ctrl-C cancels it and waits for the rest."""
        if self._loop_thread.on_loop():
            raise RuntimeError(
                "put()/fetch() would wait for the executor's own loop: from a callback, use submit_put()"
            )
        return _wait(start())

    def plan(
        self,
        event: Event,
        servers: str | Iterable[str] | Iterable[Server] | None = None,
        *,
        input: Any = _UNSET,
        timeout: float | None = None,
        batch_size: int | None = None,
        max_fail: int | float | None = None,
    ) -> Plan:
        """What ``run`` with these arguments would do, checked the same way, without contacting
        any server: see :func:`cronium_nb.rollout.make_plan`."""
        self._check_open()
        event, targets, _run_input = self._validate(event, servers, input, timeout)
        rollout = Rollout(batch_size, max_fail)
        return make_plan(event, targets, rollout, self.pool.resolve, self._parts.deployer.builds, self.store)

    @property
    def cluster(self) -> Any:
        """The ``distributed.Client`` the servers run through, or None: in this process."""
        return None if self._cluster is None else self._cluster.client

    # -- detached runs (cronium_nb.detached)

    def attach(
        self,
        execution_id: str,
        *,
        callbacks: Callbacks | None = None,
        secrets: dict[str, str] | None = None,
        background: bool = False,
    ) -> Any:
        """Follow a detached execution (of this process or of one that is gone): each server's
        output from the start, then live, up to its result, which is stored; returns the
        :class:`ExecutionResult` (``background=True``: a :class:`Job` at once, whose ``cancel()``
        stops the runs on the servers). The event's secrets were redacted on the servers already;
        ``secrets`` given here are redacted too. Ctrl-C stops following; the runs go on."""
        job = self._attach(execution_id, callbacks, secrets, cancel=False)
        if background:
            return job
        try:
            return job.result()
        except KeyboardInterrupt:
            self.stop_following(job)
            return job.result()

    def stop_following(self, job: Job) -> None:
        """Stop following a detached execution's job; its runs go on on the servers (the job's
        result says ``detached``). A job that is not detached is cancelled."""
        if job.detached:
            self._leaving.add(job.execution_id)
        job.cancel()

    def cancel_detached(self, execution_id: str, *, secrets: dict[str, str] | None = None) -> ExecutionResult:
        """Stop a detached execution's runs on every server still running it; returns the result
        (cancelled where a run was stopped), stored."""
        return self._attach(execution_id, None, secrets, cancel=True).result()

    def detached(self) -> pd.DataFrame:
        """Detached executions whose results are not all stored yet, one row per server, with its
        run's state on the server: running, finished (waiting for attach), lost, gone, unknown."""
        self._check_open()
        executions = detached_runs.pending_executions(self.store)
        names = sorted({name for row in executions for name in row["follow"]})
        known = {name: server for name, server in self.inventory.servers.items() if name in names}
        return self._loop_thread.call(detached_runs.listing(self._parts, executions, known))

    def _attach(
        self, execution_id: str, callbacks: Callbacks | None, secrets: dict[str, str] | None, *, cancel: bool
    ) -> Job:
        self._check_open()
        if any(job.execution_id == execution_id and not job.done() for job in list(self._jobs)):
            raise detached_runs.DetachedError(f"this executor follows execution {execution_id!r} already: use its job")
        plan = detached_runs.plan_attach(self.store, execution_id, secrets, self.inventory.select)
        if not plan.follow:
            job = Job(execution_id, self._loop_thread, _value(detached_runs.stored_result(self.store, plan)))
        else:
            settings = detached_runs.DetachSettings(
                self.detached_spool_bytes, self._leaving_check(execution_id), plan.started_at, cancel
            )
            coroutine = detached_runs.attach(
                plan,
                self._parts,
                callbacks=callbacks or Callbacks(),
                variable_scope=self.variable_scope,
                max_log_bytes=self.max_log_bytes,
                concurrency=self.concurrency,
                settings=settings,
            )
            job = Job(execution_id, self._loop_thread, coroutine)
        job.detached = True
        self._jobs.add(job)
        return job

    def _leaving_check(self, execution_id: str) -> Callable[[], bool]:
        return lambda: execution_id in self._leaving

    def metrics(self) -> pd.DataFrame:
        """Counters and per-phase durations (a DataFrame, shown styled in a notebook)."""
        return MetricsFrame(self._metrics.frame())

    def history(self, limit: int = 50) -> pd.DataFrame:
        """Past executions from the store, newest first (a DataFrame, shown styled in a notebook)."""
        return HistoryFrame(self.store.history(limit))

    def transfers(self, limit: int = 50) -> pd.DataFrame:
        """Past puts and fetches from the store, one row per server, the last ``limit`` transfers."""
        return self.store.transfers(limit)

    def close(self) -> None:
        """Cancel what still runs (and wait, up to ``CLOSE_WAIT_S``, for it to stop and be
        recorded), then close the connections, the runtime service and the store."""
        if self._closed:
            return
        self._closed = True
        started: list[LoopWork[Any]] = [*self._jobs, *self._transfer_jobs]
        running = [job for job in started if not job.done()]
        # Detached runs go on on their servers: this process only stops following them.
        self._leaving.update(job.execution_id for job in self._jobs if not job.done() and job.detached)
        for job in running:
            job.cancel()
        if running and not self._loop_thread.on_loop():
            concurrent.futures.wait(running, timeout=CLOSE_WAIT_S)
        if self._cluster is not None:
            self._cluster.close()
        with contextlib.suppress(Exception):
            self._loop_thread.call(self.pool.close(), timeout=30)
        with contextlib.suppress(Exception):
            self._loop_thread.call(self._runtime.close(), timeout=10)
        self._loop_thread.stop()
        self._store_worker.close()
        self.store.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- validation

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this executor is closed")

    def _validate(
        self, event: Event, servers: Any, run_input: Any, timeout: float | None
    ) -> tuple[Event, list[Server], Any]:
        if not isinstance(event, Event):
            raise TypeError(f"expected a cronium_nb.Event, got {type(event).__name__}")
        if timeout is not None:
            event = dataclasses.replace(event, timeout=timeout)  # re-validated
        if run_input is _UNSET:
            run_input = event.input
        else:
            check_input(run_input)
        return event, self._select(servers), run_input

    def _select(self, servers: Any) -> list[Server]:
        """The servers a call names: Server objects as given, else names, groups or ``all``."""
        if servers is not None and not isinstance(servers, str):
            servers = list(servers)
            if servers and all(isinstance(s, Server) for s in servers):
                return servers
        return self.inventory.select(servers)

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
        rollout: Rollout,
        placement: dict[str, list[Server]] | None,
        retry_of: str | None,
        detach: bool = False,
    ) -> ExecutionResult:
        worker = self._store_worker
        options: dict[str, Any] = {"timeout": event.timeout, "type": event.type, "continue_on_failure": keep_going}
        options |= {"api": api, **rollout.options()}
        if placement is not None:  # the Dask worker of each server
            options["cluster"] = {address: [s.name for s in servers] for address, servers in placement.items()}
        if detach:  # what attach needs
            options |= {"detach": True, "grace_period": event.grace_period}

        def prepare_and_record() -> PreparedPayload:  # on the store's thread
            payload = self._payloads.prepare(event)
            names = [s.name for s in targets]
            self.store.start_execution(
                execution_id,
                event.name,
                names,
                event_id=payload.event_id,
                payload_version=payload.version,
                options=options,
                retry_of=retry_of,
            )
            return payload

        # Cancelled meanwhile, the execution is still recorded (as cancelled): this goes to its end.
        recording = asyncio.ensure_future(worker.call(prepare_and_record))
        try:
            payload, cancelled = await asyncio.shield(recording), False
        except asyncio.CancelledError:
            uncancel()
            payload, cancelled = await uninterrupted(recording), True
        execution = Execution(
            execution_id, event, payload, run_input, callbacks, worker, api, self.variable_scope, self.max_log_bytes
        )

        settings = detached_runs.DetachSettings(self.detached_spool_bytes, self._leaving_check(execution_id))

        def run_server(server: Server, limit: asyncio.Semaphore) -> Coroutine[Any, Any, ServerResult]:
            if detach:
                return detached_runs.DetachServerRun(execution, server, self._parts, settings).run(limit)
            return ServerRun(execution, server, self._parts).run(limit)

        if self._cluster is not None and placement is not None:
            seeded = await uninterrupted(worker.call(self.store.get_variables, self.variable_scope))
            result = await self._cluster.execute(
                execution, targets, placement, seeded=seeded, keep_going=keep_going, cancelled=cancelled,
                metrics=self._metrics,
            )  # fmt: skip
        else:
            result = await execution.run(
                targets, run_server, concurrency=self.concurrency, keep_going=keep_going, cancelled=cancelled,
                rollout=rollout,
            )  # fmt: skip
        if detach:
            result = await detached_runs.settle(result, worker)
        self._metrics.executions[result.status.value] += 1
        result.retry_of = retry_of

        def rerun(names: list[str], first: str) -> ExecutionResult:  # result.retry_failed()
            again = [server for server in targets if server.name in names]
            self._check_open()
            if self._loop_thread.on_loop():
                raise RuntimeError("retry_failed() would wait for the executor's own loop: not from a callback")
            placement = self._place(again, api, rollout)
            return _wait(self._start(event, again, run_input, keep_going, Callbacks(), api, rollout, placement, first))

        result._rerun = rerun
        return result


def _wait(job: concurrent.futures.Future[ResultT]) -> ResultT:
    """``job``'s result; Ctrl-C cancels it and waits for what the cancel leaves (the cancelled
    result, recorded)."""
    try:
        return job.result()
    except KeyboardInterrupt:
        job.cancel()
        return job.result()


async def _await(job: concurrent.futures.Future[ResultT]) -> ResultT:
    """``job``'s result, awaited from any event loop; cancelling the awaiting task cancels the job
    and waits for it to stop."""
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        job.cancel()
        await asyncio.shield(asyncio.wrap_future(job))
        raise


def _cluster_dispatch(
    client: Any, executor: Executor, runner_dist: str | Path | None, attempts: int, backoff: Iterable[float]
) -> ClusterDispatch:
    """The executor's link to a Dask cluster; imported here only, so the local path never loads Dask."""
    from cronium_nb.cluster.agent import AgentSettings
    from cronium_nb.cluster.dispatch import ClusterDispatch

    settings = AgentSettings(
        ssh_options=executor.ssh_options,
        concurrency=executor.concurrency,
        deploy_attempts=attempts,
        deploy_backoff=tuple(backoff),
        runner_dist=None if runner_dist is None else str(runner_dist),
    )
    return ClusterDispatch(client, settings)


async def _value(value: Any) -> Any:
    """A coroutine that gives ``value`` (a Job of something already known)."""
    return value
