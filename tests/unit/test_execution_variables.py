"""Servers of one execution that start together share one read of the scope's variables; a
variable stored meanwhile is seen by the servers that start after it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from cronium_nb.execution import Callbacks, Execution
from cronium_nb.model import Event
from cronium_nb.payload import PreparedPayload
from cronium_nb.store import Store
from cronium_nb.store_worker import StoreWorker


class CountingStore(Store):
    reads = 0

    def get_variables(self, scope: str) -> dict[str, Any]:
        self.reads += 1
        return super().get_variables(scope)


def test_servers_starting_together_share_one_read_and_see_a_variable_stored_before_theirs(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    worker = StoreWorker(store)
    store.set_variable("scope", "color", "blue")
    payload = PreparedPayload(1, 1, "0" * 64, tmp_path / "payload", b"", "new")
    execution = Execution("e1", Event(name="e", script="true", type="sh"), payload, None, Callbacks(), worker,
                          api=False, variable_scope="scope")  # fmt: skip
    release = threading.Event()

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        worker.submit(release.wait, 30)  # the store's thread busy: the reads below stay queued
        first = [asyncio.ensure_future(execution.starting_variables()) for _ in range(50)]
        await asyncio.sleep(0)  # one turn of the loop: each of them has asked
        worker.submit(store.set_variable, "scope", "color", "green")  # a server stores a variable
        execution.variable_stored()
        second = [asyncio.ensure_future(execution.starting_variables()) for _ in range(50)]
        await asyncio.sleep(0)
        release.set()
        return list(await asyncio.gather(*first)), list(await asyncio.gather(*second))

    try:
        first, second = asyncio.run(scenario())
    finally:
        release.set()
        worker.close()
        store.close()
    assert first == [{"color": "blue"}] * 50
    assert second == [{"color": "green"}] * 50
    assert len({id(variables) for variables in first + second}) == 100  # each server its own dict
    assert store.reads == 2
