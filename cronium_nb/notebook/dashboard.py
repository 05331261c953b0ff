"""``Dashboard(executor)``: pick servers, edit a script, run and cancel it, watch it live."""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as widgets

from cronium_nb.executor import Callbacks, Executor, Job
from cronium_nb.inventory import UnknownServerError
from cronium_nb.manifest import SCRIPT_TYPES
from cronium_nb.model import Event, EventError
from cronium_nb.notebook.live import line_html
from cronium_nb.results import ExecutionResult

PANEL_LINES = 300


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
        self._lock = threading.Lock()
        inventory = executor.inventory
        choices = ["all", *inventory.groups, *(s.name for s in inventory)]
        self.picker = widgets.SelectMultiple(options=choices, value=["all"], description="servers", rows=6)
        self.script = widgets.Textarea(
            value=script, description="script", layout=widgets.Layout(width="100%", height="120px")
        )
        self.type = widgets.Dropdown(options=list(SCRIPT_TYPES), value="bash", description="type")
        self.timeout = widgets.BoundedFloatText(value=300, min=1, max=86400, description="timeout (s)")
        self.api = widgets.Checkbox(value=False, description="API mode (live variables)")
        self.run_button = widgets.Button(description="Run", button_style="success", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        self.message = widgets.HTML()
        self.tabs = widgets.Tab()
        self.status_table = widgets.HTML()
        self.variables_table = widgets.HTML()
        self.metrics_table = widgets.HTML()
        self.history_table = widgets.HTML()
        self._outputs: dict[str, widgets.HTML] = {}
        self._lines: dict[str, list[str]] = {}
        self._variables: dict[tuple[str, str], Any] = {}
        self._status: dict[str, str] = {}
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
        try:
            event = Event(name="dashboard", script=self.script.value, type=self.type.value, timeout=self.timeout.value)
            servers = [s.name for s in self.executor.inventory.select(list(self.picker.value))]
        except (EventError, UnknownServerError) as error:
            self.message.value = f'<span style="color:#cf222e">{html.escape(str(error))}</span>'
            return None
        self._start_tabs(servers)
        callbacks = Callbacks(on_line=self._on_line, on_status=self._on_status, on_variable=self._on_variable)
        self.job = self.executor.submit(event, servers, callbacks=callbacks, api=self.api.value)
        self.run_button.disabled, self.cancel_button.disabled = True, False
        self.message.value = f"running on {len(servers)} server(s)…"
        threading.Thread(target=self._wait, args=(self.job,), name="cronium-dashboard", daemon=True).start()
        return self.job

    def cancel(self) -> None:
        if self.job is not None and not self.job.done():
            self.message.value = "cancelling…"
            self.job.cancel()

    def _wait(self, job: Job) -> None:
        result = job.result()
        self.last_result = result
        self.run_button.disabled, self.cancel_button.disabled = False, True
        self.message.value = f"<b>{html.escape(result.status.value)}</b> (execution {result.execution_id})"
        self.status_table.value = _table(result.summary)
        self._refresh_tables()

    # -- live updates (on the executor's thread)

    def _start_tabs(self, servers: list[str]) -> None:
        self._outputs = {name: widgets.HTML() for name in servers}
        self._lines = {name: [] for name in servers}
        self._variables.clear()
        self._status = {name: "pending" for name in servers}
        self.tabs.children = list(self._outputs.values())
        self.tabs.titles = tuple(servers)
        self.status_table.value = _table(self._status_frame(self._status))

    def _on_line(self, server: str, stream: str, text: str, ts: float) -> None:
        with self._lock:
            lines = self._lines[server]
            lines.append(line_html(stream, text))
            del lines[:-PANEL_LINES]
            self._outputs[server].value = '<pre style="margin:0">' + "\n".join(lines) + "</pre>"

    def _on_status(self, result: Any) -> None:
        with self._lock:
            label = result.status.value if not result.phase else f"{result.status.value} ({result.phase})"
            self._status[result.server] = label
            self.status_table.value = _table(self._status_frame(self._status))

    def _on_variable(self, server: str, name: str, value: Any) -> None:
        with self._lock:
            self._variables[(server, name)] = value
            rows = "".join(
                f"<tr><td>{html.escape(s)}</td><td>{html.escape(n)}</td><td>{html.escape(repr(v))}</td></tr>"
                for (s, n), v in sorted(self._variables.items())
            )
            self.variables_table.value = f"<table><tr><th>server</th><th>name</th><th>value</th></tr>{rows}</table>"

    @staticmethod
    def _status_frame(statuses: dict[str, str]) -> Any:
        import pandas as pd

        return pd.DataFrame({"server": list(statuses), "status": list(statuses.values())})

    def _refresh_tables(self) -> None:
        self.metrics_table.value = _table(self.executor.metrics())
        history = self.executor.history(10)
        columns = ["execution_id", "event", "status", "servers_ok", "servers", "started_at"]
        self.history_table.value = _table(history[columns] if len(history) else history)
