"""The worker side of ``Executor(cluster=client)``: the cronium agent each Dask worker keeps.

:class:`CroniumAgent` is a Dask worker plugin, registered by the client's executor (so workers
that join later get one too). On its worker it holds a private local :class:`Executor`: its own
loop thread, connection pool, runner sessions and deployer, and a store in the worker's local
directory for payloads and what probes learnt about servers. It lives as long as the worker (or
until the client's executor closes), so a second execution through the cluster finds its
connections open and its runners deployed. The agent drives that executor's parts (its loop
thread, store worker, payload service, run parts, metrics) directly, as the executor's own
``_execute`` does: it is the executor's other front, inside the package.

:func:`run_group` is the Dask task (pinned to one worker) that runs one execution's share of
servers there, with the executor's own :class:`ServerRun` per server, inside a
:class:`RelayedExecution`: output lines, status changes and each server's final result go to the
client as Dask events (:mod:`~cronium_nb.cluster.relay`) instead of into a store, and the client
writes them into the notebook's store. :func:`cancel_group` is run out of band
(``Client.run``, so it never waits behind tasks) and cancels it: the agent stops the remote work
exactly as a local cancel does (the runner stops the whole process tree).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin, get_worker

from cronium_nb.cluster.relay import (
    DEPLOY_FAILED,
    DONE,
    LINES,
    RELAY_ACK_WAIT_S,
    RELAY_BATCH_BYTES,
    RELAY_FLUSH_S,
    RELAY_UNACKED_BYTES,
    STATUS,
    result_fields,
)
from cronium_nb.execution import Callbacks, Execution
from cronium_nb.jobs import Job
from cronium_nb.model import Event, Server
from cronium_nb.payload import PreparedPayload
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.server_run import ServerRun
from cronium_nb.ssh.options import SSHOptions
from cronium_nb.ssh.remote_run import uncancel, uninterrupted

if TYPE_CHECKING:
    from distributed import Worker

    from cronium_nb.executor import Executor

log = logging.getLogger("cronium_nb.cluster.agent")
CANCEL_MEMORY_S = 3600.0  # a cancel that arrived before its task is remembered this long


@dataclass(frozen=True)
class AgentSettings:
    """What the client's executor passes to its agents: the settings of their local executors.
    ``runner_dist`` None: the worker's own runner builds (the installed package's)."""

    ssh_options: SSHOptions
    concurrency: int
    deploy_attempts: int
    deploy_backoff: tuple[float, ...]
    runner_dist: str | None


@dataclass(frozen=True)
class GroupRequest:
    """One execution's share of servers for one worker."""

    execution_id: str
    event: Event
    servers: list[Server]
    input: Any
    variables: dict[str, Any]  # the notebook store's variables when the execution started
    keep_going: bool


class Relay:
    """Batches one execution's items and sends them to the client as Dask events, and bounds the
    line text sent but not yet acknowledged (see :mod:`~cronium_nb.cluster.relay`). On the
    agent's loop; ``Worker.log_event`` is safe from any thread."""

    def __init__(self, worker: Any, topic: str, execution_id: str) -> None:
        self.worker, self.topic, self.execution_id = worker, topic, execution_id
        self.items: list[list[Any]] = []
        self.size = 0
        self.done: set[str] = set()
        self.sent = 0  # line text sent in all
        self.acknowledged = 0  # of which the client has said it took in
        self._room = asyncio.Event()
        self._room.set()

    def send(self, item: list[Any], size: int = 0) -> None:
        self.items.append(item)
        self.size += size
        self.sent += size
        if self.size >= RELAY_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.worker.log_event(self.topic, {"execution": self.execution_id, "items": self.items})
            self.items, self.size = [], 0

    def acknowledge(self, received: int) -> None:
        """The client has taken in ``received`` bytes of line text (on the agent's loop)."""
        self.acknowledged = max(self.acknowledged, received)
        if self.sent - self.acknowledged <= RELAY_UNACKED_BYTES:
            self._room.set()

    async def room(self) -> None:
        """Wait while more than ``RELAY_UNACKED_BYTES`` are unacknowledged (at most
        ``RELAY_ACK_WAIT_S`` at a time: a client gone must not hang the worker)."""
        while self.sent - self.acknowledged > RELAY_UNACKED_BYTES:
            self.flush()  # what waits in the batch is part of what the client must see first
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), RELAY_ACK_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("no acknowledgement from the client for %g s: relaying on", RELAY_ACK_WAIT_S)
                return

    async def keep_flushing(self) -> None:
        while True:
            await asyncio.sleep(RELAY_FLUSH_S)
            self.flush()

    def status(self, result: ServerResult) -> None:
        if result.server not in self.done:
            self.send([STATUS, result.server, result.status.value, result.phase, result.arch])

    def deploy_failed(self, server: str, attempt: int, reason: str) -> None:
        self.send([DEPLOY_FAILED, server, attempt, reason])

    def finished(self, result: ServerResult) -> None:
        """A server's final result, sent at once (with what is waiting before it, in order)."""
        if result.server not in self.done:
            self.done.add(result.server)
            self.send([DONE, result.server, result_fields(result)])
            self.flush()


class RelayedExecution(Execution):
    """An :class:`Execution` whose output goes to the client instead of a store: lines are
    relayed as they come (the client numbers, stores and bounds them, and marks truncation)."""

    relay: Relay

    def lines(self, server: str, stream: str, text: str, count: int, ts: float) -> None:
        self.relay.send([LINES, server, stream, text, count, ts], len(text))

    def truncation_marker(self, server: str) -> None:
        """The client stores the output, so it is the one that marks where storing stopped."""

    async def room_for_output(self) -> None:
        await self.relay.room()


class CroniumAgent(WorkerPlugin):
    """The per-worker agent (see the module docstring); ``name`` is the plugin's name, unique
    per client executor, and ``topic`` the Dask event topic its relays go to."""

    def __init__(self, name: str, topic: str, settings: AgentSettings) -> None:
        self.name, self.topic, self.settings = name, topic, settings  # (what is pickled to the workers)
        self._local: Executor | None = None
        self._worker: Worker | None = None

    def setup(self, worker: Worker) -> None:
        from cronium_nb.executor import Executor

        self._worker = worker
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._relays: dict[str, Relay] = {}
        self._early_cancels: dict[str, float] = {}  # execution id -> when its cancel came
        state = Path(worker.local_directory) / self.name  # private (0700), removed with the worker
        settings = self.settings
        self._local = Executor(
            state_dir=state,
            ssh_options=settings.ssh_options,
            concurrency=settings.concurrency,
            deploy_attempts=settings.deploy_attempts,
            deploy_backoff=settings.deploy_backoff,
            runner_dist=settings.runner_dist,
        )

    async def teardown(self, worker: Worker) -> None:
        """Close the local executor (cancelling what still runs) off the worker's event loop."""
        if self._local is not None:
            local, self._local = self._local, None
            await asyncio.to_thread(local.close)

    # -- called by the tasks

    def run(self, request: GroupRequest) -> dict[str, dict[str, Any]]:
        """Run ``request`` (in a worker thread) and return each server's result fields."""
        if self._local is None or self._worker is None:
            raise RuntimeError(f"the cronium agent {self.name} is not set up on this worker")
        relay = Relay(self._worker, self.topic, request.execution_id)
        job = Job(request.execution_id, self._local._loop_thread, self._execute(self._local, request, relay))
        with self._lock:
            self._jobs[request.execution_id] = job
            self._relays[request.execution_id] = relay
            cancel_now = self._early_cancels.pop(request.execution_id, None) is not None
        if cancel_now:
            job.cancel()
        try:
            result = job.result()
        finally:
            with self._lock:
                self._jobs.pop(request.execution_id, None)
                self._relays.pop(request.execution_id, None)
        return {name: result_fields(server) for name, server in result.servers.items()}

    def cancel(self, execution_id: str) -> None:
        """Stop the execution's servers on this worker (at once; the task then returns their
        cancelled results). Before its task arrived: remembered, and it never starts them."""
        with self._lock:
            job = self._jobs.get(execution_id)
            if job is None:
                now = time.monotonic()
                self._early_cancels = {k: t for k, t in self._early_cancels.items() if now - t < CANCEL_MEMORY_S}
                self._early_cancels[execution_id] = now
        if job is not None:
            job.cancel()

    def acknowledge(self, execution_id: str, received: int) -> None:
        """The client took in ``received`` bytes of the execution's line text (any thread)."""
        with self._lock:
            relay = self._relays.get(execution_id)
        if relay is not None and self._local is not None:
            self._local._loop_thread.loop.call_soon_threadsafe(relay.acknowledge, received)

    async def _execute(self, local: Executor, request: GroupRequest, relay: Relay) -> ExecutionResult:
        """As :meth:`Executor._execute`, on the local executor's loop, relaying instead of storing."""
        store_worker, store = local._store_worker, local.store
        scope = f"cluster:{request.execution_id}"  # this execution's copy of the notebook's variables

        def prepare() -> PreparedPayload:  # on the store's thread
            for name, value in request.variables.items():
                store.set_variable(scope, name, value)
            return local._payloads.prepare(request.event)

        preparing = asyncio.ensure_future(store_worker.call(prepare))
        try:
            payload, cancelled = await asyncio.shield(preparing), False
        except asyncio.CancelledError:
            uncancel()
            payload, cancelled = await uninterrupted(preparing), True
        callbacks = Callbacks(on_status=relay.status, on_deploy_failed=relay.deploy_failed)
        execution = RelayedExecution(
            request.execution_id,
            request.event,
            payload,
            request.input,
            callbacks,
            store_worker,
            False,
            scope,
            local.max_log_bytes,
        )
        execution.relay = relay

        async def run_server(server: Server, limit: asyncio.Semaphore) -> ServerResult:
            result = await ServerRun(execution, server, local._parts).run(limit)
            relay.finished(result)
            return result

        flusher = asyncio.ensure_future(relay.keep_flushing())
        try:
            result = await execution.run(
                request.servers, run_server, concurrency=local.concurrency, keep_going=request.keep_going,
                cancelled=cancelled,
            )  # fmt: skip
        finally:
            flusher.cancel()
            await uninterrupted(store_worker.call(store.delete_variables, scope))
        for server in result.servers.values():  # those cancelled before they began, too
            relay.finished(server)
        relay.flush()
        local._metrics.executions[result.status.value] += 1
        return result


def agent_on(worker: Worker, name: str) -> CroniumAgent:
    agent = worker.plugins.get(name)
    if not isinstance(agent, CroniumAgent):
        raise RuntimeError(f"no cronium agent {name!r} on worker {worker.address} (was the executor closed?)")
    return agent


def run_group(agent_name: str, request: GroupRequest) -> dict[str, dict[str, Any]]:
    """The Dask task: run ``request`` on this worker's agent."""
    return agent_on(get_worker(), agent_name).run(request)


def cancel_group(agent_name: str, execution_id: str, dask_worker: Worker) -> None:
    """Run with ``Client.run`` (out of band): cancel the execution on this worker."""
    agent_on(dask_worker, agent_name).cancel(execution_id)


def acknowledge_group(agent_name: str, execution_id: str, received: int, dask_worker: Worker) -> None:
    """Run with ``Client.run``: the client took in ``received`` bytes of the execution's lines."""
    agent_on(dask_worker, agent_name).acknowledge(execution_id, received)
