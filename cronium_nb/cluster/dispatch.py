"""The client side of ``Executor(cluster=client)``, on the executor's loop.

:class:`ClusterDispatch` belongs to one executor: it registers the worker plugin (the agents,
see :mod:`~cronium_nb.cluster.agent`), listens on the executor's relay topic, and places servers
on workers (:mod:`~cronium_nb.cluster.placement`). :class:`ClusterRun` is one execution: one
Dask task per worker, pinned to it (``workers=[address]``, ``allow_other_workers=False``,
``retries=0``); what the agents relay goes into the client's :class:`Execution`, so the
notebook's store, the live views and the callbacks see it as for a local run, and each server's
final result is stored here, with the worker it ran on.

A worker lost mid-run (its process killed, its machine gone) is noticed by polling the
scheduler's list of workers every ``LOSS_POLL_S``: its unfinished servers fail with
``worker_lost`` and its task is cancelled, so the scripts are never rerun on another worker
(they are not assumed idempotent). How fast the scheduler notices: at once when the worker's
connection closes (a killed process), else after ``distributed.scheduler.worker-ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from cronium_nb.cluster.agent import (
    AgentSettings,
    CroniumAgent,
    GroupRequest,
    acknowledge_group,
    cancel_group,
    run_group,
)
from cronium_nb.cluster.placement import place
from cronium_nb.cluster.relay import (
    DEPLOY_FAILED,
    DONE,
    LINES,
    RELAY_ACK_BYTES,
    STATUS,
    apply_fields,
    result_fields,
)
from cronium_nb.execution import Execution
from cronium_nb.metrics import Metrics
from cronium_nb.model import Server, Status, variable_too_deep
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.ssh.remote_run import uncancel, uninterrupted
from cronium_nb.store import SERVER_RESULT_FIELDS

log = logging.getLogger("cronium_nb.cluster")

LOSS_POLL_S = 1.0  # how often a running execution asks the scheduler which workers are alive
SCHEDULER_FAILURES = 5  # consecutive failed asks before the servers count as lost
RELAY_GRACE_S = 10.0  # a task done: how long its relayed results (sent before it ended) may lag


class ClusterDispatch:
    """One executor's link to a Dask cluster (``client``: a synchronous ``distributed.Client``)."""

    def __init__(self, client: Any, settings: AgentSettings) -> None:
        from distributed import Client

        if not isinstance(client, Client):
            raise TypeError(f"cluster must be a distributed.Client, got {type(client).__name__}")
        # (Client.asynchronous is True only on the client's own loop; _asynchronous is how it was made)
        if getattr(client, "_asynchronous", False) or client.asynchronous:
            raise ValueError("cluster: pass a synchronous distributed.Client (Client(...) without asynchronous=True)")
        self.client = client
        key = uuid.uuid4().hex[:12]
        self.agent_name = f"cronium-agent-{key}"
        self.topic = f"cronium-relay-{key}"
        self._runs: dict[str, ClusterRun] = {}
        client.register_plugin(CroniumAgent(self.agent_name, self.topic, settings), name=self.agent_name)
        client.subscribe_topic(self.topic, self._on_event)

    def workers(self) -> dict[str, dict[str, float]]:
        """``{address: resources}`` of the cluster's workers now (asks the scheduler)."""
        info = self.client.scheduler_info(n_workers=-1)
        return {address: dict(worker.get("resources") or {}) for address, worker in info["workers"].items()}

    def place(self, targets: list[Server]) -> dict[str, list[Server]]:
        """Which worker runs which server; raises :class:`PlacementError` when some cannot run."""
        return place(targets, self.workers())

    async def execute(
        self,
        execution: Execution,
        targets: list[Server],
        placement: dict[str, list[Server]],
        *,
        seeded: dict[str, Any],
        keep_going: bool,
        cancelled: bool,
        metrics: Metrics,
    ) -> ExecutionResult:
        """Run ``execution`` on the workers of ``placement``: as :meth:`Execution.run`."""
        run = ClusterRun(self, execution, placement, seeded, keep_going, metrics)
        self._runs[execution.execution_id] = run
        try:
            return await execution.run(
                targets, run.run_server, concurrency=max(1, len(targets)), keep_going=keep_going, cancelled=cancelled
            )
        finally:
            del self._runs[execution.execution_id]
            run.close()

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A relay message (on the Dask client's thread): to its execution's loop."""
        _when, message = event
        run = self._runs.get(message.get("execution", ""))
        if run is not None:
            with contextlib.suppress(RuntimeError):  # the executor's loop is closed: nobody listens
                run.loop.call_soon_threadsafe(run.relayed, message["items"])

    def close(self) -> None:
        """Stop listening and remove the agents (each closes its connections)."""
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.topic)
        with contextlib.suppress(Exception):
            self.client.unregister_worker_plugin(self.agent_name)


@dataclass
class Group:
    """One worker's share of an execution."""

    index: int
    address: str
    servers: list[Server]
    waiting: dict[str, asyncio.Future[dict[str, Any]]]  # server -> its final result fields
    task: Any = None  # the distributed.Future of run_group, once submitted
    started_at: float = 0.0
    cancel_sent: bool = False
    received: int = 0  # line text taken in (see relay.py's flow control)
    acknowledged: int = 0  # of which the worker has been told
    acknowledging: bool = False

    def unresolved(self) -> list[str]:
        return [name for name, future in self.waiting.items() if not future.done()]


class ClusterRun:
    """One execution through the cluster (see the module docstring)."""

    def __init__(
        self,
        dispatch: ClusterDispatch,
        execution: Execution,
        placement: dict[str, list[Server]],
        seeded: dict[str, Any],
        keep_going: bool,
        metrics: Metrics,
    ) -> None:
        self.dispatch, self.execution, self.seeded, self.keep_going, self.metrics = (
            dispatch, execution, seeded, keep_going, metrics,
        )  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self.groups = [
            Group(index, address, servers, {s.name: self.loop.create_future() for s in servers})
            for index, (address, servers) in enumerate(placement.items())
        ]
        self.group_of = {server.name: group for group in self.groups for server in group.servers}
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def run_server(self, server: Server, limit: asyncio.Semaphore) -> ServerResult:
        """The client's part of one server: wait for its result from the worker, then store it.
        Cancelled, cancel the worker's share and still wait for the result (bounded: the worker
        stops its servers as a local run does, or it is lost)."""
        group = self.group_of[server.name]
        self._start(group)
        waiting = group.waiting[server.name]
        try:
            fields = await asyncio.shield(waiting)
        except asyncio.CancelledError:
            uncancel()
            self._cancel(group)
            fields = await uninterrupted(waiting)
        return self._finish(server, group, fields)

    def relayed(self, items: list[list[Any]]) -> None:
        """What an agent relayed, in order (on the loop)."""
        execution = self.execution
        for item in items:
            kind, server = item[0], item[1]
            group = self.group_of.get(server)
            if group is None or group.waiting[server].done():
                continue  # (only after a lost worker: its server's row is final)
            if kind == LINES:
                _kind, _server, stream, text, count, ts = item
                execution.lines(server, stream, text, count, ts)
                group.received += len(text)
            elif kind == STATUS:
                result = execution.results[server]
                result.status, result.arch = Status(item[2]), item[4] or result.arch
                execution.status(result, item[3])
            elif kind == DEPLOY_FAILED and execution.callbacks.on_deploy_failed is not None:
                execution.callbacks.on_deploy_failed(server, item[2], item[3])
            elif kind == DONE:
                self._resolve(group, server, item[2])
        for group in self.groups:
            if group.received - group.acknowledged >= RELAY_ACK_BYTES and not group.acknowledging:
                group.acknowledging = True
                self._spawn(self._acknowledge(group))

    async def _acknowledge(self, group: Group) -> None:
        """Tell the worker how much line text was taken in, once the store keeps up with it;
        again while more came meanwhile (one acknowledgement in flight per worker)."""
        try:
            while group.received - group.acknowledged >= RELAY_ACK_BYTES:
                await self.execution.room_for_output()
                received = group.received
                call = functools.partial(
                    self.dispatch.client.run,
                    acknowledge_group,
                    self.dispatch.agent_name,
                    self.execution.execution_id,
                    received,
                    workers=[group.address],
                    on_error="ignore",
                )
                await self.loop.run_in_executor(None, call)
                group.acknowledged = received
        except Exception as error:  # the worker is gone (the watcher fails its servers)
            log.warning("could not acknowledge output to Dask worker %s: %s", group.address, error)
        finally:
            group.acknowledging = False

    def close(self) -> None:
        """The execution is over: stop watching, and let the scheduler forget the tasks."""
        for task in [self._watcher, *self._background]:
            if task is not None:
                task.cancel()
        for group in self.groups:
            if group.task is not None:
                group.task.release()

    # -- the worker's task

    def _start(self, group: Group) -> None:
        if group.task is not None:
            return
        execution = self.execution
        request = GroupRequest(
            execution.execution_id, execution.event, group.servers, execution.input, self.seeded, self.keep_going
        )
        group.started_at = time.monotonic()
        group.task = self.dispatch.client.submit(
            run_group,
            self.dispatch.agent_name,
            request,
            key=f"cronium-{execution.execution_id}-{group.index}",
            workers=[group.address],
            allow_other_workers=False,
            retries=0,
            pure=False,
        )
        group.task.add_done_callback(functools.partial(self._task_done, group))
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    def _task_done(self, group: Group, _task: Any) -> None:  # on the Dask client's thread
        with contextlib.suppress(RuntimeError):  # the executor's loop is closed
            self.loop.call_soon_threadsafe(self._spawn, self._collect(group))

    async def _collect(self, group: Group) -> None:
        """The task ended: the results of servers whose relayed result has not come (normally
        none: the agent relays each one before its task returns), or why the task failed."""
        task = group.task
        pending = [group.waiting[name] for name in group.unresolved()]
        if pending and task.status == "finished":
            await asyncio.wait(pending, timeout=RELAY_GRACE_S)
        if not group.unresolved():
            return

        def fetch() -> tuple[dict[str, dict[str, Any]], str | None]:  # in a thread: it waits on the network
            try:
                return task.result(), None
            except BaseException as error:  # the agent's exception, or the task cancelled
                return {}, f"{type(error).__name__}: {error}"

        results, failure = await self.loop.run_in_executor(None, fetch)
        for name in group.unresolved():
            if name in results:
                log.warning("the relayed result of %s did not come; its live output may be incomplete", name)
                self._resolve(group, name, results[name])
            else:
                error = f"the cronium agent on Dask worker {group.address} failed: {failure}"
                self._resolve(group, name, self._failed(name, "internal", error, group))

    def _cancel(self, group: Group) -> None:
        if group.cancel_sent:
            return
        group.cancel_sent = True
        call = functools.partial(
            self.dispatch.client.run,
            cancel_group,
            self.dispatch.agent_name,
            self.execution.execution_id,
            workers=[group.address],
            on_error="ignore",
        )

        async def send() -> None:
            try:
                await self.loop.run_in_executor(None, call)
            except Exception as error:  # the worker is gone: the watcher fails its servers
                log.warning("could not send the cancel to Dask worker %s: %s", group.address, error)

        self._spawn(send())

    # -- lost workers

    async def _watch(self) -> None:
        """Until every started group is resolved: fail the servers of a worker that left."""
        failures = 0
        while any(group.task is not None and group.unresolved() for group in self.groups):
            await asyncio.sleep(LOSS_POLL_S)
            try:
                alive = set(await self.loop.run_in_executor(None, self.dispatch.workers))
                failures = 0
                why = "it left the cluster: its process died, or its machine or network went away"
            except Exception as error:
                failures += 1
                if failures < SCHEDULER_FAILURES:
                    continue
                alive, why = set(), f"the Dask scheduler could not be reached: {error}"
            for group in self.groups:
                if group.task is not None and group.address not in alive and group.unresolved():
                    self._lost(group, why)

    def _lost(self, group: Group, why: str) -> None:
        error = (
            f"the Dask worker {group.address} was lost while it ran this server ({why}); not rerun on another "
            "worker: the script may or may not have run to its end"
        )
        for name in group.unresolved():
            self._resolve(group, name, self._failed(name, "worker_lost", error, group))
        task = group.task
        # Cancelled, the pinned task can never run on a worker that comes back at that address.
        self._spawn(self.loop.run_in_executor(None, task.cancel))

    # -- results

    def _failed(self, name: str, kind: str, error: str, group: Group) -> dict[str, Any]:
        fields = result_fields(self.execution.results[name])
        fields.update(status=Status.FAILED.value, error_kind=kind, error=error)
        fields["duration_s"] = time.monotonic() - group.started_at
        return fields

    def _resolve(self, group: Group, name: str, fields: dict[str, Any]) -> None:
        waiting = group.waiting[name]
        if not waiting.done():
            waiting.set_result(fields)

    def _finish(self, server: Server, group: Group, fields: dict[str, Any]) -> ServerResult:
        """A server's final result into the execution: its changed variables and its row
        stored, the metrics counted, the live views told (as ServerRun does for a local run)."""
        execution, store = self.execution, self.execution.store
        result = execution.results[server.name]
        apply_fields(result, fields)
        result.worker = group.address
        for name, value in result.variables.items():
            if (name in self.seeded and self.seeded[name] == value) or variable_too_deep(name, value):
                continue  # unchanged; or refused, and the server failed for it on the worker
            updated_by = f"{execution.execution_id}/{server.name}"
            store.submit(store.store.set_variable, execution.variable_scope, name, value, updated_by=updated_by)
        execution.truncation_marker(server.name)
        self.metrics.record_server(result)
        if result.deploy is not None:
            self.metrics.record_deploy(result.deploy)
        elif result.error_kind == "deploy":
            self.metrics.record_deploy("failed")
        row = {name: getattr(result, name) for name in SERVER_RESULT_FIELDS}
        store.submit(store.store.update_server, execution.execution_id, server.name, **row)
        execution.status(result)
        return result

    def _spawn(self, awaitable: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
