"""Live views of a running execution: widget panels in a notebook, prefixed lines elsewhere.

One pipeline for every view (the ``%%cronium`` cell's, a ``--bg`` handle's, the Dashboard's):
executor callbacks arrive on the executor's loop thread and only put events on a queue
(:class:`EventQueue`); whoever owns the view drains the queue, applies the events (cheap: state
only) and redraws at most every ``REFRESH_S``. The owner is the cell's own thread while
``%%cronium`` blocks (so that a kernel interrupt lands there), or a small pump thread
(:class:`BackgroundRun`) for ``--bg`` runs and the Dashboard. Panel size (``PANEL_LINES``) and
line shortening (:func:`display_text`) are defined here once.
"""

from __future__ import annotations

import html
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from cronium_nb.executor import Callbacks, Job
from cronium_nb.model import Status
from cronium_nb.results import ExecutionResult

DISPLAY_ENV = "CRONIUM_DISPLAY"  # "text" forces prefixed lines (set for headless execution)
PANEL_LINES = 200  # lines kept per server panel
REFRESH_S = 0.1  # a view is redrawn at most this often; in between, events are only queued
DISPLAY_LINE_CHARS = 2000  # a longer line is shortened on screen (the store keeps it whole)
# C0 and C1 control characters but tab: a script's output must not move the cursor, retitle the
# terminal or hide text in the view (ESC sequences), so they are shown as escapes.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
STATUS_COLOURS = {
    Status.PENDING: "#888",
    Status.RUNNING: "#1f6feb",
    Status.SUCCESS: "#1a7f37",
    Status.FAILED: "#cf222e",
    Status.TIMEOUT: "#bc4c00",
    Status.CANCELLED: "#6e7781",
    Status.PARTIAL: "#9a6700",
    Status.INTERRUPTED: "#6e7781",
    Status.DETACHED: "#8250df",  # goes on on the server, followed by no one
}


def display_text(text: str) -> str:
    """A line as it may be shown: control characters neutralised, a very long one shortened."""
    if len(text) > DISPLAY_LINE_CHARS:
        text = f"{text[:DISPLAY_LINE_CHARS]} … [{len(text) - DISPLAY_LINE_CHARS} more characters]"
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def line_html(stream: str, text: str) -> str:
    """One output line for an HTML panel; stderr in red."""
    shown = html.escape(display_text(text))
    return f'<span style="color:#cf222e">{shown}</span>' if stream == "stderr" else shown


def panel_html(lines: Iterable[tuple[str, str]]) -> str:
    """A server's output panel: (stream, text) lines, oldest first."""
    return '<pre style="margin:0;font-size:12px">' + "\n".join(line_html(*line) for line in lines) + "</pre>"


def widgets_wanted() -> bool:
    """True inside a Jupyter kernel, unless CRONIUM_DISPLAY=text (headless runs set it)."""
    if os.environ.get(DISPLAY_ENV, "").lower() == "text":
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class EventQueue:
    """Executor callbacks -> a thread-safe queue of (kind, ...) tuples.

    The callbacks run on the executor's loop thread and do nothing but enqueue; :meth:`drain`,
    on the thread that owns the view, applies the events and redraws the view once per call.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def callbacks(self) -> Callbacks:
        put = self.queue.put
        return Callbacks(
            on_line=lambda server, stream, text, ts: put(("on_line", server, stream, text)),
            on_status=lambda result: put(("on_status", result.server, result.status, result.phase, result.exit_code)),
            on_deploy_failed=lambda server, attempt, reason: put(
                ("on_line", server, "stderr", f"[deploy attempt {attempt} failed: {reason}]")
            ),
            on_variable=lambda server, name, value: put(("on_variable", server, name, value)),
        )

    def drain(self, view: LiveView, wait: float = REFRESH_S) -> None:
        """Apply to ``view`` the events queued until ``wait`` seconds from now, then redraw it
        once (``view.tick()``): however fast lines arrive, a view is drawn at most every ``wait``."""
        deadline = time.monotonic() + wait
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self._apply(view, self.queue.get(timeout=remaining))
        except queue.Empty:
            pass
        for _ in range(self.queue.qsize()):  # what is queued now, not a flood that keeps arriving
            try:
                event = self.queue.get_nowait()
            except queue.Empty:
                break
            self._apply(view, event)
        view.tick()

    @staticmethod
    def _apply(view: LiveView, event: tuple[Any, ...]) -> None:
        kind, *rest = event
        getattr(view, kind)(*rest)


class LiveView:
    """What a running execution looks like; subclasses draw it."""

    def __init__(self, servers: list[str], title: str) -> None:
        self.servers = servers
        self.title = title
        self.started = time.monotonic()
        self.statuses = {name: Status.PENDING for name in servers}
        self.phases: dict[str, str | None] = {name: None for name in servers}
        self.exit_codes: dict[str, int | None] = {name: None for name in servers}
        self.finished_at: dict[str, float] = {}
        self.variables: dict[str, dict[str, Any]] = {name: {} for name in servers}

    def on_line(self, server: str, stream: str, text: str) -> None:
        raise NotImplementedError

    def on_status(self, server: str, status: Status, phase: str | None, exit_code: int | None) -> None:
        self.statuses[server], self.phases[server], self.exit_codes[server] = status, phase, exit_code
        if status.finished:
            self.finished_at.setdefault(server, time.monotonic())

    def on_variable(self, server: str, name: str, value: Any) -> None:
        self.variables[server][name] = value

    def tick(self) -> None:
        """Called once per drain (every ``REFRESH_S``): draw what changed, refresh clocks."""

    def note(self, text: str) -> None:
        raise NotImplementedError

    def finish(self, result: ExecutionResult) -> None:
        for server, server_result in result.servers.items():
            self.statuses[server] = server_result.status
            self.exit_codes[server] = server_result.exit_code

    def failed(self, error: BaseException) -> None:
        """The execution ended without a result (an error in the orchestrator, the executor closed)."""
        self.note(f"failed: {error!r}")

    def elapsed(self, server: str) -> float:
        return self.finished_at.get(server, time.monotonic()) - self.started

    def done_count(self) -> int:
        return sum(1 for status in self.statuses.values() if status.finished)


class TextView(LiveView):
    """Prefixed lines (``[amd64-1] ...``) for terminals and headless runs."""

    def __init__(self, servers: list[str], title: str) -> None:
        super().__init__(servers, title)
        print(f"[cronium] {title} on {', '.join(servers)}", flush=True)

    def on_line(self, server: str, stream: str, text: str) -> None:
        marker = "!" if stream == "stderr" else ""
        print(f"[{server}]{marker} {display_text(text)}", flush=True)

    def on_status(self, server: str, status: Status, phase: str | None, exit_code: int | None) -> None:
        before = self.statuses[server]
        super().on_status(server, status, phase, exit_code)
        if status.finished and not before.finished:
            code = "" if exit_code is None else f", exit {exit_code}"
            print(f"[{server}] {status.value} in {self.elapsed(server):.1f} s{code}", flush=True)

    def on_variable(self, server: str, name: str, value: Any) -> None:
        super().on_variable(server, name, value)
        print(f"[{server}] variable {name} = {value!r}", flush=True)

    def note(self, text: str) -> None:
        print(f"[cronium] {text}", flush=True)

    def finish(self, result: ExecutionResult) -> None:
        super().finish(result)
        print(f"[cronium] {result.event_name}: {result.status.value}", flush=True)
        print(result.summary.to_string(index=False), flush=True)


class OutputPanels:
    """One HTML widget per server showing its last ``PANEL_LINES`` output lines.

    :meth:`add` only records a line; :meth:`render` (from a view's ``tick``) redraws the panels
    that changed since, so a burst of lines costs one redraw per panel.
    """

    def __init__(self, servers: list[str], **layout: str) -> None:
        import ipywidgets as widgets

        self.lines: dict[str, deque[tuple[str, str]]] = {name: deque(maxlen=PANEL_LINES) for name in servers}
        self.widgets = {name: widgets.HTML(layout=widgets.Layout(**layout)) for name in servers}
        self._changed: set[str] = set(servers)

    def add(self, server: str, stream: str, text: str) -> None:
        self.lines[server].append((stream, text))
        self._changed.add(server)

    def render(self) -> None:
        changed, self._changed = self._changed, set()
        for server in changed:
            self.widgets[server].value = panel_html(self.lines[server])


class WidgetView(LiveView):
    """One panel per server (status badge, elapsed time, output, exit code) and a progress bar."""

    def __init__(self, servers: list[str], title: str, job: Job | None = None) -> None:
        super().__init__(servers, title)
        import ipywidgets as widgets

        self.header = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=len(servers), description="servers")
        self.badges = {name: widgets.HTML() for name in servers}
        self.panels = OutputPanels(servers, max_height="240px", overflow="auto")
        self.outputs = self.panels.widgets
        panels = [
            widgets.VBox(
                [self.badges[name], self.outputs[name]], layout=widgets.Layout(border="1px solid #ddd", padding="4px")
            )
            for name in servers
        ]
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger", icon="stop")
        if job is not None:
            self.cancel_button.on_click(lambda _button: job.cancel())
        else:
            self.cancel_button.layout.display = "none"
        self.widget = widgets.VBox([widgets.HBox([self.header, self.progress, self.cancel_button]), *panels])
        self.tick()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def on_line(self, server: str, stream: str, text: str) -> None:
        self.panels.add(server, stream, text)

    def note(self, text: str) -> None:
        self.header.value = f"<b>{html.escape(self.title)}</b> — {html.escape(text)}"

    def tick(self) -> None:
        for server in self.servers:  # clocks move on every tick (an unchanged value is not sent)
            self.badges[server].value = self._badge(server)
        self.panels.render()
        self.progress.value = self.done_count()
        if not self.header.value:
            self.note("running")

    def _badge(self, server: str) -> str:
        status = self.statuses[server]
        colour = STATUS_COLOURS.get(status, "#888")
        label = status.value if not (status == Status.RUNNING and self.phases[server]) else f"{self.phases[server]}…"
        code = "" if self.exit_codes[server] is None else f" · exit {self.exit_codes[server]}"
        variables = ""
        if self.variables[server]:
            shown = ", ".join(f"{k}={v!r}" for k, v in self.variables[server].items())
            variables = f" · <code>{html.escape(shown)}</code>"
        return (
            f'<b>{html.escape(server)}</b> <span style="background:{colour};color:white;border-radius:4px;'
            f'padding:0 6px">{html.escape(label)}</span> {self.elapsed(server):.1f} s{code}{variables}'
        )

    def finish(self, result: ExecutionResult) -> None:
        super().finish(result)
        self.tick()
        self.note(result.status.value)
        self.cancel_button.disabled = True

    def failed(self, error: BaseException) -> None:
        super().failed(error)
        self.cancel_button.disabled = True


def make_view(servers: list[str], title: str, job: Job | None = None) -> LiveView:
    return WidgetView(servers, title, job) if widgets_wanted() else TextView(servers, title)


class BackgroundRun:
    """The handle ``%%cronium --bg`` returns: ``cancel()``, ``wait(timeout)``, ``result()``."""

    def __init__(self, job: Job, view: LiveView, events: EventQueue) -> None:
        self.job = job
        self.view = view
        self._events = events
        self._pump = threading.Thread(target=self._run, name=f"cronium-view-{job.execution_id}", daemon=True)
        self._pump.start()

    def _run(self) -> None:
        while not self.job.done():
            self._events.drain(self.view)
        self._events.drain(self.view, wait=0)
        try:
            result = self.job.result()
        except Exception as error:  # shown in the view; result() raises it to whoever asks
            self.view.failed(error)
        else:
            self.view.finish(result)

    def cancel(self) -> None:
        self.view.note("cancelling…")
        self.job.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self.job.wait(timeout)

    def result(self, timeout: float | None = None) -> ExecutionResult:
        result = self.job.result(timeout)
        self.join()
        return result

    def join(self, timeout: float | None = 5.0) -> None:
        """Until the view has drawn the end of the run (once the job is done, at once)."""
        self._pump.join(timeout)

    @property
    def status(self) -> Status:
        return self.job.status

    def __repr__(self) -> str:
        return f"<cronium background run {self.job.execution_id}: {self.job.status.value}; .cancel(), .result()>"
