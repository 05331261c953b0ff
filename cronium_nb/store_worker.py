"""The store's own thread: SQLite never runs on the executor's event loop.

That loop carries every connection's keepalives and every server's output, so it must not wait
on a disk, on gzip, or on another process holding the database's write lock (up to the store's
30 s busy timeout). Every store call an execution makes goes through :class:`StoreWorker`: one
thread, one queue, so calls run in the order they were made (a server's result before the
execution's end, a log chunk before the next). Writes are queued and not waited for; reads and
the execution's last write are awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from cronium_nb.store import Store

T = TypeVar("T")
log = logging.getLogger("cronium_nb.store")


class StoreWorker:
    """Runs a :class:`Store`'s calls on one thread, in order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cronium-store")

    def submit(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue a call; a failure is logged (the caller does not wait to hear of it)."""
        future = self._thread.submit(function, *args, **kwargs)
        future.add_done_callback(_log_failure)
        return future

    async def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Queue a call and wait for its result without blocking the loop."""
        return await self.queued(function, *args, **kwargs)

    def queued(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue a call now (in order with the calls before and after it); its result as a
        future of the running loop."""
        return asyncio.wrap_future(self._thread.submit(function, *args, **kwargs))

    async def drain(self) -> None:
        """Wait until every call queued so far has run."""
        await self.call(lambda: None)

    # -- what the runner sessions remember about hosts (ssh.sessions.HostFacts)

    async def host_facts(self, address: str) -> dict[str, Any] | None:
        return await self.call(self.store.host_facts, address)

    def remember_host(self, address: str, facts: dict[str, Any]) -> None:
        self.submit(self.store.remember_host, address, facts)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._thread.shutdown(wait=True)


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a store write failed", exc_info=future.exception())
