"""``Dashboard(executor)``: pick servers, edit a script, run and cancel it, watch it live.

A run is shown through the same pipeline as a ``%%cronium`` cell (:mod:`cronium_nb.notebook.live`):
the executor's callbacks only queue events, and a pump thread applies them to a
:class:`DashboardView` and redraws it at most every ``REFRESH_S``.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from cronium_nb.executor import Executor, Job
from cronium_nb.inventory import UnknownServerError
from cronium_nb.manifest import SCRIPT_TYPES
from cronium_nb.model import DEFAULT_TIMEOUT_S, Event, EventError, Status
from cronium_nb.notebook.live import BackgroundRun, EventQueue, LiveView, OutputPanels
from cronium_nb.results import ExecutionResult


def _table(frame: Any) -> str:
    return frame.to_html(index=False, border=0, classes="cronium-table") if len(frame) else "<i>none yet</i>"


class Dashboard:
    """A widget dashboard over one executor.

    Server picker (names and groups), script editor, type and timeout, API mode, Run and Cancel
    buttons, one live tab per server, the status table, metrics, recent history, and live
    variable updates when API mode is on. ``dashboard.run()`` / ``.cancel()`` do what the
    buttons do; ``dashboard.last_result`` holds the latest result.
    """

    def __init__(self, executor: Executor, script: str = "echo hello from $(hostname)") -> None:
        self.executor = executor
        self.job: Job | None = None
        self.last_result: ExecutionResult | None = None
        self._run: BackgroundRun | None = None
        inventory = executor.inventory
        choices = ["all", *inventory.groups, *(s.name for s in inventory)]
        self.picker = widgets.SelectMultiple(options=choices, value=["all"], description="servers", rows=6)
        self.script = widgets.Textarea(
            value=script, description="script", layout=widgets.Layout(width="100%", height="120px")
        )
        self.type = widgets.Dropdown(options=list(SCRIPT_TYPES), value="bash", description="type")
        self.timeout = widgets.BoundedFloatText(value=DEFAULT_TIMEOUT_S, min=1, max=86400, description="timeout (s)")
        self.api = widgets.Checkbox(value=False, description="API mode (live variables)")
        self.run_button = widgets.Button(description="Run", button_style="success", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        self.message = widgets.HTML()
        self.tabs = widgets.Tab()
        self.status_table = widgets.HTML()
        self.variables_table = widgets.HTML()
        self.metrics_table = widgets.HTML()
        self.history_table = widgets.HTML()
        self._outputs: dict[str, widgets.HTML] = {}  # the current run's output tabs, by server
        self.run_button.on_click(lambda _button: self.run())
        self.cancel_button.on_click(lambda _button: self.cancel())
        tables = widgets.Accordion(
            children=[self.status_table, self.variables_table, self.metrics_table, self.history_table],
            titles=("status", "variables", "metrics", "history"),
            selected_index=0,
        )
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.picker, widgets.VBox([self.type, self.timeout, self.api])]),
                self.script,
                widgets.HBox([self.run_button, self.cancel_button, self.message]),
                self.tabs,
                tables,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self._refresh_tables()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- actions

    def run(self) -> Job | None:
        if self.job is not None and not self.job.done():
            self.message.value = "<b>already running</b>"
            return None
        if self._run is not None:
            self._run.join()  # the last run's view has drawn its end (its job is done)
        try:
            event = Event(name="dashboard", script=self.script.value, type=self.type.value, timeout=self.timeout.value)
            servers = [s.name for s in self.executor.inventory.select(list(self.picker.value))]
        except (EventError, UnknownServerError) as error:
            self.message.value = f'<span style="color:#cf222e">{html.escape(str(error))}</span>'
            return None
        events = EventQueue()
        self.job = self.executor.submit(event, servers, callbacks=events.callbacks(), api=self.api.value)
        self.run_button.disabled, self.cancel_button.disabled = True, False
        self.message.value = f"running on {len(servers)} server(s)…"
        self._run = BackgroundRun(self.job, DashboardView(self, servers), events)
        return self.job

    def cancel(self) -> None:
        if self._run is not None and not self._run.job.done():
            self._run.cancel()

    def _refresh_tables(self) -> None:
        self.metrics_table.value = _table(self.executor.metrics())
        history = self.executor.history(10)
        columns = ["execution_id", "event", "status", "servers_ok", "servers", "started_at"]
        self.history_table.value = _table(history[columns] if len(history) else history)


class DashboardView(LiveView):
    """One run as the Dashboard shows it: an output tab per server, the status and variables
    tables, the message line; at the end the result, the metrics and the history."""

    def __init__(self, dashboard: Dashboard, servers: list[str]) -> None:
        super().__init__(servers, "dashboard")
        self.dashboard = dashboard
        self.panels = OutputPanels(servers)
        self._tables_changed = True
        self._variables_changed = False
        dashboard._outputs = self.panels.widgets
        dashboard.tabs.children = [self.panels.widgets[name] for name in servers]
        dashboard.tabs.titles = tuple(servers)
        dashboard.variables_table.value = ""
        self.tick()

    def on_line(self, server: str, stream: str, text: str) -> None:
        self.panels.add(server, stream, text)

    def on_status(self, server: str, status: Status, phase: str | None, exit_code: int | None) -> None:
        super().on_status(server, status, phase, exit_code)
        self._tables_changed = True

    def on_variable(self, server: str, name: str, value: Any) -> None:
        super().on_variable(server, name, value)
        self._variables_changed = True

    def note(self, text: str) -> None:
        self.dashboard.message.value = html.escape(text)

    def tick(self) -> None:
        self.panels.render()
        if self._tables_changed:
            self._tables_changed = False
            self.dashboard.status_table.value = _table(self._status_frame())
        if self._variables_changed:
            self._variables_changed = False
            rows = "".join(
                f"<tr><td>{html.escape(server)}</td><td>{html.escape(name)}</td><td>{html.escape(repr(value))}</td></tr>"
                for server in sorted(self.variables)
                for name, value in sorted(self.variables[server].items())
            )
            self.dashboard.variables_table.value = (
                f"<table><tr><th>server</th><th>name</th><th>value</th></tr>{rows}</table>"
            )

    def _status_frame(self) -> Any:
        import pandas as pd

        labels = [
            status.value if not self.phases[server] else f"{status.value} ({self.phases[server]})"
            for server, status in self.statuses.items()
        ]
        return pd.DataFrame({"server": list(self.statuses), "status": labels})

    def finish(self, result: ExecutionResult) -> None:
        super().finish(result)
        self.tick()
        dashboard = self.dashboard
        dashboard.status_table.value = _table(result.summary)
        dashboard._refresh_tables()
        dashboard.message.value = f"<b>{html.escape(result.status.value)}</b> (execution {result.execution_id})"
        dashboard.run_button.disabled, dashboard.cancel_button.disabled = False, True
        dashboard.last_result = result  # last: whoever waits for it finds the view complete

    def failed(self, error: BaseException) -> None:
        self.tick()
        dashboard = self.dashboard
        dashboard.message.value = f'<span style="color:#cf222e">failed: {html.escape(repr(error))}</span>'
        dashboard.run_button.disabled, dashboard.cancel_button.disabled = False, True
