"""An execution's bookkeeping on the loop: servers that start together share one read of the
scope's variables (a variable stored meanwhile is seen by the servers that start after it), and
stored output is a prefix of the output, cut at a line, within ``max_log_bytes``."""

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


def make_execution(tmp_path: Path, worker: StoreWorker, **options: Any) -> Execution:
    payload = PreparedPayload(1, 1, "0" * 64, tmp_path / "payload", b"", "new")
    return Execution("e1", Event(name="e", script="true", type="sh"), payload, None, Callbacks(), worker,
                     api=False, variable_scope="scope", **options)  # fmt: skip


def test_servers_starting_together_share_one_read_and_see_a_variable_stored_before_theirs(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    worker = StoreWorker(store)
    store.set_variable("scope", "color", "blue")
    execution = make_execution(tmp_path, worker)
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


def test_stored_output_is_the_lines_that_fit_then_a_marker(tmp_path: Path) -> None:
    store = Store(tmp_path)
    worker = StoreWorker(store)
    store.start_execution("e1", "e", ["a", "b"])
    execution = make_execution(tmp_path, worker, max_log_bytes=100)
    lines = [f"line {i:02d} " + "x" * 12 for i in range(10)]  # 20 characters each
    try:
        execution.lines("a", "stdout", "", 1, 1.0)  # an empty line is a line
        execution.lines("a", "stdout", "\n".join(lines), 10, 2.0)  # one burst, over the limit
        execution.lines("b", "stdout", "late", 1, 3.0)  # after the cut: not stored either
        execution.truncation_marker("a")
        execution.truncation_marker("b")
        execution.log.flush()
        for future, _ in execution._in_flight:
            future.result()
        logs = store.logs("e1")
    finally:
        worker.close()
        store.close()
    stdout = logs[logs["stream"] == "stdout"]
    assert stdout["line"].tolist() == ["", *lines[:4]]  # 4 x 20 + 3 newlines = 83 of 100
    assert stdout["seq"].tolist() == [1, 2, 3, 4, 5]
    markers = logs[logs["stream"] == "cronium"]
    assert markers["server"].tolist() == ["a", "b"]
    assert markers["line"].str.contains("output truncated: 6 lines").iloc[0]
    assert markers["line"].str.contains("output truncated: 1 lines").iloc[1]
    assert markers["seq"].tolist() == [12, 2]
