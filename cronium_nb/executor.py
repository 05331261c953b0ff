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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import uuid
import weakref
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cronium_nb import resources
from cronium_nb.become import BecomeAuth, BecomePasswordSource
from cronium_nb.config import state_dir as resolve_state_dir
from cronium_nb.execution import DEFAULT_MAX_LOG_BYTES, Callbacks, Execution
from cronium_nb.inventory import Inventory
from cronium_nb.jobs import Job, LoopThread
from cronium_nb.metrics import Metrics
from cronium_nb.model import Event, Server, check_input
from cronium_nb.payload import PayloadService, PreparedPayload
from cronium_nb.results import ExecutionResult, ServerResult
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

__all__ = ["DEFAULT_CONCURRENCY", "Callbacks", "Executor", "Job"]

DEFAULT_CONCURRENCY = 32
CLOSE_WAIT_S = 60.0  # close(): how long running executions get to stop and be recorded
_UNSET: Any = object()  # `input` not given: the event's own input


class Executor:
    """Runs events on servers over SSH. See the module docstring for the API.

    ``deploy_attempts`` and ``deploy_backoff`` (seconds before each retry) govern runner
    deployment; ``concurrency`` bounds servers worked on at once; ``continue_on_failure=False``
    cancels the other servers at the first failure; ``max_log_bytes`` bounds the output text
    stored per execution (1 GiB): past it lines are counted, not stored, and each server's log
    ends with a ``cronium`` stream line saying how much was dropped. ``become_password`` (or a
    callable returning it) is for servers whose sudo asks for one when an event runs with
    ``become``; without it the executor asks once, when a server first needs it
    (:mod:`cronium_nb.become`).
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
        become_password: BecomePasswordSource = None,
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
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # not finished yet, or not collected
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
    ) -> Job:
        """Start running ``event`` and return a :class:`Job` at once (also from a callback).

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
        job = Job(execution_id, self._loop_thread, coroutine)
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
        )
        try:
            return job.result()
        except KeyboardInterrupt:
            job.cancel()
            return job.result()

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
        )
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            job.cancel()
            await asyncio.shield(asyncio.wrap_future(job))
            raise

    def metrics(self) -> pd.DataFrame:
        return self._metrics.frame()

    def history(self, limit: int = 50) -> pd.DataFrame:
        return self.store.history(limit)

    def close(self) -> None:
        """Cancel what still runs (and wait, up to ``CLOSE_WAIT_S``, for it to stop and be
        recorded), then close the connections, the runtime service and the store."""
        if self._closed:
            return
        self._closed = True
        running = [job for job in list(self._jobs) if not job.done()]
        for job in running:
            job.cancel()
        if running and not self._loop_thread.on_loop():
            concurrent.futures.wait(running, timeout=CLOSE_WAIT_S)
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
        worker = self._store_worker
        options = {"timeout": event.timeout, "type": event.type, "continue_on_failure": keep_going, "api": api}

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

        def run_server(server: Server, limit: asyncio.Semaphore) -> Coroutine[Any, Any, ServerResult]:
            return ServerRun(execution, server, self._parts).run(limit)

        result = await execution.run(
            targets, run_server, concurrency=self.concurrency, keep_going=keep_going, cancelled=cancelled
        )
        self._metrics.executions[result.status.value] += 1
        return result
