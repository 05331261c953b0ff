"""Output faster than the store can write it waits for the store (SSH flow control holds the
runner), so the log text queued in memory stays bounded, and every line is still stored."""

from __future__ import annotations

import threading
import time

import pytest

import cronium_nb.execution
from cronium_nb import Event
from cronium_nb.store import Store
from cronium_nb.store_worker import StoreWorker

LIMIT = 2**20
BATCH = 4 * 2**20  # LogBuffer's batch_bytes: one batch may pass the limit


@pytest.mark.timeout(120)
def test_queued_log_text_stays_bounded_when_the_store_is_slow(local_servers, local_executor, monkeypatch) -> None:
    monkeypatch.setattr(cronium_nb.execution, "MAX_LOG_BYTES_IN_FLIGHT", LIMIT)
    queued = {"now": 0, "peak": 0}
    lock = threading.Lock()
    original_submit = StoreWorker.submit
    original_append = Store.append_log_chunks

    def slow_append(self, chunks):
        time.sleep(0.2)  # a slow disk
        original_append(self, chunks)

    def counting_submit(self, function, *args, **kwargs):
        if getattr(function, "__name__", "") != "slow_append":
            return original_submit(self, function, *args, **kwargs)
        size = sum(len(chunk.lines) for chunk in args[0])
        with lock:
            queued["now"] += size
            queued["peak"] = max(queued["peak"], queued["now"])

        def written(*call_args):
            try:
                function(*call_args)
            finally:
                with lock:
                    queued["now"] -= size

        return original_submit(self, written, *args)

    monkeypatch.setattr(Store, "append_log_chunks", slow_append)
    monkeypatch.setattr(StoreWorker, "submit", counting_submit)
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    lines = 200_000  # 100 bytes each: 20 MB
    result = executor.run(Event(name="flood", script=f"yes {'x' * 99} | head -n {lines}"))
    assert result.ok, result.summary.to_string()
    assert queued["peak"] <= LIMIT + BATCH, queued
    assert len(result.logs) == lines
