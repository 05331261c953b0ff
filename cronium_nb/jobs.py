"""The executor's private event loop thread, :class:`LoopWork` (work on it, as a future) and
:class:`Job`, a running execution.

All network work of an executor happens on one asyncio loop in a daemon thread (:class:`LoopThread`);
callers in other threads (a notebook cell, a widget callback) start work there and get a
:class:`Job` back: a :class:`concurrent.futures.Future` of the :class:`ExecutionResult`, as
ipyparallel's ``AsyncResult`` is, so ``job.result()``, ``concurrent.futures.wait([job])`` and
``await asyncio.wrap_future(job)`` all work. Cancelling a job stops the remote work; the job
then completes with the cancelled result (it is not itself a cancelled future).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cronium_nb.model import Status

if TYPE_CHECKING:
    from cronium_nb.results import ExecutionResult

ResultT = TypeVar("ResultT")


class LoopThread:
    """A private asyncio loop running in a daemon thread."""

    def __init__(self, name: str = "cronium-executor") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def on_loop(self) -> bool:
        """Whether the caller runs on this loop's thread (a callback): it must not wait for the loop."""
        return threading.current_thread() is self._thread

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (never from the loop itself)."""
        if self.on_loop():
            coroutine.close()
            raise RuntimeError("cannot wait for the executor's loop from its own thread (a callback)")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class LoopWork(concurrent.futures.Future, Generic[ResultT]):
    """A coroutine running on an executor's loop, seen from other threads as a future of its
    value. ``cancel()`` cancels the task once (its cleanup must not be cut short by a second) and
    returns at once; the future then completes with what the cancelled coroutine returns."""

    def __init__(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, ResultT]) -> None:
        super().__init__()
        self._loop = loop
        self._task: asyncio.Task[ResultT] | None = None
        self._cancel_sent = False
        # Not waiting for the task to exist: a callback on the loop may submit, too.
        loop.call_soon_threadsafe(self._start, coroutine)

    def _start(self, coroutine: Coroutine[Any, Any, ResultT]) -> None:
        self._task = self._loop.create_task(coroutine)
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[ResultT]) -> None:
        if task.cancelled():  # the executor's loop stopped under it
            self.set_exception(concurrent.futures.CancelledError())
        elif task.exception() is not None:
            self.set_exception(task.exception())
        else:
            self.set_result(task.result())

    def cancel(self) -> bool:
        """Stop the work (returns at once; ``result()`` waits for it). False when it has already
        ended."""
        if self.done():
            return False
        if not self._cancel_sent:
            self._cancel_sent = True
            # Queued after _start (the loop runs its thread-safe calls in order), so the task
            # exists; and cancelled only after its first step, so the work is recorded.
            self._loop.call_soon_threadsafe(self._loop.call_soon, self._cancel_task)
        return True

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the work ends; True when it has."""
        concurrent.futures.wait([self], timeout=timeout)
        return self.done()


class Job(LoopWork["ExecutionResult"]):
    """A running execution, a future of its :class:`~cronium_nb.results.ExecutionResult`.

    ``cancel()`` stops the remote work on every server and returns at once; ``result()`` then
    gives the cancelled result once every server has stopped. ``wait(timeout)`` and ``status``
    are conveniences for a notebook.
    """

    def __init__(self, execution_id: str, loop_thread: LoopThread, coroutine: Coroutine[Any, Any, ExecutionResult]):
        self.execution_id = execution_id
        self.detached = False  # a detached execution: closing the executor leaves it running
        super().__init__(loop_thread.loop, coroutine)

    @property
    def status(self) -> Status:
        if self.done() and self.exception() is None:
            return self.result().status
        return Status.RUNNING

    def __repr__(self) -> str:
        return f"<Job {self.execution_id} {self.status.value}>"
