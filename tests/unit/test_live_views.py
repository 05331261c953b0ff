"""The live-view pipeline of the notebook layer, cell views and the Dashboard alike: executor
callbacks only queue events, and a view is drawn on its owner's thread at most every REFRESH_S,
with one panel size and one line shortening for all."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cronium_nb import Inventory, Server
from cronium_nb.executor import Callbacks
from cronium_nb.model import DEFAULT_TIMEOUT_S, Event, Status
from cronium_nb.notebook.dashboard import Dashboard
from cronium_nb.notebook.live import (
    DISPLAY_LINE_CHARS,
    PANEL_LINES,
    REFRESH_S,
    EventQueue,
    WidgetView,
)
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.store import Store

SERVERS = ["web1", "web2"]


def record_writes(widget: Any, writes: list[str]) -> None:
    """Note the thread of every change of ``widget.value``."""
    widget.observe(lambda _change: writes.append(threading.current_thread().name), names="value")


def feed(callbacks: Callbacks, lines: int) -> float:
    """What the executor's loop thread does for a chatty run; returns the seconds the callbacks took."""
    assert callbacks.on_line is not None and callbacks.on_status is not None and callbacks.on_variable is not None
    started = time.perf_counter()
    for server in SERVERS:
        callbacks.on_status(ServerResult(server, Status.RUNNING, phase="run"))
    for n in range(lines):
        for server in SERVERS:
            callbacks.on_line(server, "stderr" if n % 10 == 0 else "stdout", f"{server} line {n}", time.time())
    callbacks.on_line(SERVERS[0], "stdout", "x" * (DISPLAY_LINE_CHARS + 10), time.time())
    callbacks.on_variable(SERVERS[0], "count", lines)
    return time.perf_counter() - started


def test_cell_view_callbacks_only_queue_and_the_view_draws_once_per_drain() -> None:
    view = WidgetView(SERVERS, "test")
    writes: list[str] = []
    for widget in view.outputs.values():
        record_writes(widget, writes)
    events = EventQueue()
    network = threading.Thread(target=feed, args=(events.callbacks(), 5000), name="network-loop")
    network.start()
    network.join()
    assert writes == []  # nothing drawn on the callbacks' thread, nor before a drain
    started = time.monotonic()
    events.drain(view)
    assert time.monotonic() - started >= REFRESH_S * 0.9  # a drain is the throttle: one draw per REFRESH_S
    assert writes == [threading.current_thread().name] * len(SERVERS)  # one draw per panel for 10 001 lines
    shown = view.outputs["web1"].value
    assert shown.count("\n") == PANEL_LINES - 1  # the last PANEL_LINES lines
    assert "web1 line 4999" in shown and "web1 line 4800" not in shown
    assert "[10 more characters]" in shown  # display_text shortened the long line
    assert view.statuses["web1"] == Status.RUNNING and view.variables["web1"] == {"count": 5000}
    events.drain(view, wait=0)  # nothing new: no redraw
    assert len(writes) == len(SERVERS)


class FakeJob(concurrent.futures.Future):
    execution_id = "fake-1"
    status = Status.RUNNING


class FakeExecutor:
    """What the Dashboard uses of an executor; ``submit`` hands the callbacks to a test thread."""

    def __init__(self) -> None:
        self.inventory = Inventory([Server(name, host=f"10.0.0.{n}") for n, name in enumerate(SERVERS, start=1)])
        self.submitted: list[tuple[Event, list[str], Callbacks, FakeJob]] = []

    def submit(self, event: Event, servers: list[str], *, callbacks: Callbacks, api: bool = False) -> FakeJob:
        job = FakeJob()
        self.submitted.append((event, servers, callbacks, job))
        return job

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame({"executions": [1]})

    def history(self, limit: int = 50) -> pd.DataFrame:
        return pd.DataFrame()


def test_the_dashboard_is_fed_by_the_same_queued_throttled_pipeline(tmp_path: Path) -> None:
    executor = FakeExecutor()
    dashboard = Dashboard(executor)  # type: ignore[arg-type]
    assert dashboard.timeout.value == DEFAULT_TIMEOUT_S
    job = dashboard.run()
    assert job is not None and dashboard.run_button.disabled and not dashboard.cancel_button.disabled
    event, servers, callbacks, _job = executor.submitted[0]
    assert servers == SERVERS and event.timeout == DEFAULT_TIMEOUT_S
    writes: list[str] = []
    for widget in [*dashboard._outputs.values(), dashboard.status_table, dashboard.variables_table]:
        record_writes(widget, writes)

    network = threading.Thread(target=feed, args=(callbacks, 5000), name="network-loop")
    started = time.monotonic()
    network.start()
    network.join()
    time.sleep(3 * REFRESH_S)
    with Store(tmp_path) as store:
        result = ExecutionResult(
            "fake-1", "dashboard", Status.SUCCESS, {s: ServerResult(s, Status.SUCCESS, exit_code=0) for s in SERVERS},
            store,
        )  # fmt: skip
        job.set_result(result)
        deadline = time.monotonic() + 5
        while dashboard.last_result is None and time.monotonic() < deadline:
            time.sleep(0.01)
    elapsed = time.monotonic() - started

    assert dashboard.last_result is result
    assert "network-loop" not in writes  # the callbacks drew nothing
    # Throttled: each widget is drawn at most once per REFRESH_S (and once more at the end), not
    # once per line as before.
    assert len(writes) <= 4 * (elapsed / REFRESH_S + 2), (len(writes), elapsed)
    shown = dashboard._outputs["web2"].value
    assert "web2 line 4999" in shown and shown.count("\n") == PANEL_LINES - 1
    assert "success" in dashboard.status_table.value
    assert "count" in dashboard.variables_table.value and "5000" in dashboard.variables_table.value
    assert "success" in dashboard.message.value and "fake-1" in dashboard.message.value
    assert not dashboard.run_button.disabled and dashboard.cancel_button.disabled


def test_a_dashboard_run_that_fails_gives_the_buttons_back() -> None:
    executor = FakeExecutor()
    dashboard = Dashboard(executor)  # type: ignore[arg-type]
    job = dashboard.run()
    assert job is not None
    job.set_exception(RuntimeError("the executor was closed"))
    deadline = time.monotonic() + 5
    while dashboard.run_button.disabled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not dashboard.run_button.disabled and dashboard.cancel_button.disabled
    assert "the executor was closed" in dashboard.message.value
    assert dashboard.last_result is None
    assert dashboard.run() is not None  # and it can run again


@pytest.mark.parametrize("bad", ["", "   "])
def test_the_dashboard_reports_a_bad_script_without_running(bad: str) -> None:
    executor = FakeExecutor()
    dashboard = Dashboard(executor)  # type: ignore[arg-type]
    dashboard.script.value = bad
    assert dashboard.run() is None
    assert "empty script" in dashboard.message.value and executor.submitted == []


def test_the_magic_and_the_dashboard_default_to_the_events_timeout() -> None:
    from IPython.core.magic_arguments import parse_argstring

    from cronium_nb.notebook.magics import CroniumMagics

    assert Event(name="e", script="true").timeout == DEFAULT_TIMEOUT_S
    assert parse_argstring(CroniumMagics.cronium, "").timeout == DEFAULT_TIMEOUT_S
    assert f"default {DEFAULT_TIMEOUT_S:g}" in (CroniumMagics.cronium.__doc__ or "")
