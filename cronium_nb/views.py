"""How results and tables look in a notebook: the HTML of a result, ``ex.history()`` and
``ex.metrics()`` (status in colour, durations formatted, errors readable, the per-phase timeline),
and plain text where there is no HTML frontend.

One source of truth for the status and phase colours (the live views and ``plot_timeline`` use
them too) and for telling a notebook frontend from a headless run: :func:`html_frontend` is
False in terminal IPython, with ``CRONIUM_DISPLAY=text``, and in a kernel whose current request
cannot take input (nbclient and papermill send ``allow_stdin=False``; JupyterLab and VS Code do
not), so a notebook executed headless keeps plain text in its outputs. Tables are rendered with
pandas' ``Styler`` (Jinja2).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

from cronium_nb.model import Status

if TYPE_CHECKING:
    from pandas.io.formats.style import Styler

DISPLAY_ENV = "CRONIUM_DISPLAY"  # "text" forces plain text and prefixed lines (headless runs set it)
STATUS_COLOURS = {
    Status.PENDING: "#888",
    Status.RUNNING: "#1f6feb",
    Status.SUCCESS: "#1a7f37",
    Status.FAILED: "#cf222e",
    Status.TIMEOUT: "#bc4c00",
    Status.CANCELLED: "#6e7781",
    Status.PARTIAL: "#9a6700",
    Status.SKIPPED: "#8250df",
    Status.INTERRUPTED: "#6e7781",
    Status.DETACHED: "#1b7c83",  # goes on on the server, followed by no one
}
PHASES = ("connect", "deploy", "upload", "run", "cleanup")
PHASE_COLOURS = dict(zip(PHASES, ("#8c959f", "#bf8700", "#0969da", "#1a7f37", "#6e7781"), strict=True))
ERROR_CHARS = 400  # an error longer than this is shortened in the table (the full text in its tooltip)


def html_frontend() -> bool:
    """True when the notebook shown to a person renders HTML (see the module docstring)."""
    if os.environ.get(DISPLAY_ENV, "").lower() == "text":
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False  # plain Python, or terminal IPython
    kernel = getattr(shell, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", True))


def format_duration(seconds: Any) -> str:
    """``0.42 s``, ``12.3 s``, ``2 min 05 s``, ``1 h 02 min``; an em dash when unknown."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    seconds = float(seconds)
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def status_badge(status: Any) -> str:
    """A status as a coloured label (HTML)."""
    try:
        colour = STATUS_COLOURS[Status(status)]
    except ValueError:
        colour = "#888"
    text = html.escape(str(status))
    return f'<span style="background:{colour};color:white;border-radius:4px;padding:0 6px">{text}</span>'


def _status_cell(status: Any) -> str:
    """Styler CSS for a status cell."""
    try:
        colour = STATUS_COLOURS[Status(status)]
    except ValueError:
        return ""
    return f"color: white; background-color: {colour}; font-weight: bold"


def readable_error(error: Any) -> str:
    """An error for an HTML table cell: escaped, line breaks kept, a very long one shortened."""
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return ""
    text = str(error)
    shown = text if len(text) <= ERROR_CHARS else f"{text[:ERROR_CHARS]} … [{len(text) - ERROR_CHARS} more]"
    return f'<span title="{html.escape(text, quote=True)}" style="white-space:pre-wrap">{html.escape(shown)}</span>'


def timeline_bar(phases: dict[str, float], scale: float, width_px: int = 240) -> str:
    """One server's phases as a stacked bar (HTML), ``scale`` seconds for the full width."""
    if not phases or scale <= 0:
        return ""
    parts = []
    for phase in PHASES:
        seconds = phases.get(phase)
        if seconds:
            width = max(1, round(width_px * seconds / scale))
            parts.append(
                f'<span title="{phase}: {format_duration(seconds)}" style="display:inline-block;height:10px;'
                f'width:{width}px;background:{PHASE_COLOURS[phase]}"></span>'
            )
    return f'<span style="white-space:nowrap">{"".join(parts)}</span>'


def phase_legend() -> str:
    return " ".join(
        f'<span style="display:inline-block;width:10px;height:10px;background:{PHASE_COLOURS[phase]}"></span> {phase}'
        for phase in PHASES
    )


def plain_cell(value: Any) -> str:
    """Any other table cell as HTML: escaped, missing values as an em dash, whole numbers kept
    whole (an exit code next to a missing one is a float to pandas), times to the second."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return html.escape(str(value))


def style_table(frame: pd.DataFrame, *, html_columns: tuple[str, ...] = ()) -> Styler:
    """``frame`` as a Styler: status columns in colour, ``*_s`` and ``duration_s`` columns
    formatted as durations, ``error`` readable, every other cell escaped (see
    :func:`plain_cell`); ``html_columns`` are already HTML."""
    formatters: dict[Any, str | Callable[[object], str] | None] = {}
    for column in frame.columns:
        if column in html_columns:
            continue
        if column == "error":
            formatters[column] = readable_error
        elif str(column).endswith("_s"):
            formatters[column] = format_duration
        else:
            formatters[column] = plain_cell
    styler = frame.style.hide(axis="index").format(formatters)
    if "status" in frame.columns:
        styler = styler.map(_status_cell, subset=["status"])
    return styler.set_table_styles([{"selector": "td", "props": "vertical-align: top; text-align: left"}])


class StyledFrame(pd.DataFrame):
    """A DataFrame shown styled in a notebook with an HTML frontend (plain text elsewhere);
    everything else is the DataFrame's, and any frame derived from it is a plain DataFrame."""

    title: ClassVar[str] = ""

    @property
    def _constructor(self) -> Callable[..., pd.DataFrame]:
        return pd.DataFrame

    def styled(self) -> Styler:
        return style_table(pd.DataFrame(self))

    def html(self) -> str:
        """The styled HTML, whatever the frontend."""
        caption = f"<strong>{html.escape(self.title)}</strong>" if self.title else ""
        return f"<div>{caption}{self.styled().to_html()}</div>"

    def _repr_html_(self) -> str | None:
        return self.html() if html_frontend() else None


class HistoryFrame(StyledFrame):
    """``ex.history()``: past executions, newest first."""

    title = "history"


class MetricsFrame(StyledFrame):
    """``ex.metrics()``: counters and per-phase durations (durations formatted, the hit rate in %)."""

    title = "metrics"

    def styled(self) -> Styler:
        frame = pd.DataFrame(self)
        shown = [
            _metric_value(str(metric), value) for metric, value in zip(frame["metric"], frame["value"], strict=True)
        ]
        return style_table(frame.assign(value=shown))


def _metric_value(metric: str, value: Any) -> str:
    if metric.endswith("_s"):
        return format_duration(value)
    if metric.endswith("_rate"):
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"
    return str(value)
