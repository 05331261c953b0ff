"""Progress of a ``%cronium_put`` / ``%cronium_fetch`` in a notebook: bytes done per server.

The same pipeline as the run views (:mod:`cronium_nb.notebook.live`): the transfer's progress
callback runs on the executor's loop thread and only queues ``(server, done, total)``; the
cell's thread drains the queue and redraws at most every ``REFRESH_S`` (so a kernel interrupt
lands there and cancels the transfer). With a widget frontend it is one HTML table with a bar
per server; elsewhere (terminal IPython, headless runs) a line per server at each quarter done.
"""

from __future__ import annotations

import html
import queue
import time
from typing import Any

import pandas as pd

from cronium_nb.notebook.live import REFRESH_S, widgets_wanted
from cronium_nb.transfer import Progress, TransferJob

QUARTERS = 4  # text mode: a line per server each time another quarter of its bytes is done


def size_text(count: int | None) -> str:
    """Bytes for people: ``12.5 MiB``."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class TransferProgress:
    """Per-server bytes done of one transfer, drawn as a widget or printed as lines."""

    def __init__(self, servers: list[str], title: str) -> None:
        self.title = title
        self.done = dict.fromkeys(servers, 0)
        self.total: dict[str, int | None] = dict.fromkeys(servers)
        self._events: queue.Queue[tuple[str, int, int | None]] = queue.Queue()
        self._quarters_shown = dict.fromkeys(servers, 0)
        self._widget: Any = None

    def show(self) -> None:
        """Start showing: the (empty) widget, or the title line."""
        if widgets_wanted():
            import ipywidgets as widgets
            from IPython.display import display

            self._widget = widgets.HTML()
            self._draw()
            display(self._widget)
        else:
            print(f"[cronium] {self.title} on {', '.join(self.done)}", flush=True)

    def callback(self) -> Progress:
        """The transfer's ``progress``: only queues (it runs on the executor's loop thread)."""
        return lambda server, done, total: self._events.put((server, done, total))

    def follow(self, job: TransferJob) -> pd.DataFrame:
        """Draw ``job``'s progress until it ends and return its table; a kernel interrupt
        (Ctrl-C) cancels it and the cancelled table is returned."""
        self.show()
        try:
            while not job.done():
                self.drain()
        except KeyboardInterrupt:
            self.note("interrupted: cancelling the transfer…")
            job.cancel()
            while not job.done():
                self.drain()
        self.drain(wait=0)
        return job.result()

    def drain(self, wait: float = REFRESH_S) -> None:
        deadline = time.monotonic() + wait
        changed = False
        while True:
            try:
                server, done, total = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.done[server], self.total[server] = done, total
            changed = True
            self._print(server)
        if changed and self._widget is not None:
            self._draw()

    def note(self, text: str) -> None:
        print(f"[cronium] {text}", flush=True)

    def _print(self, server: str) -> None:
        total = self.total[server]
        if self._widget is not None or not total:
            return
        quarters = min(QUARTERS, self.done[server] * QUARTERS // total)
        if quarters > self._quarters_shown[server]:
            self._quarters_shown[server] = quarters
            shown = f"{size_text(self.done[server])} of {size_text(total)}"
            print(f"[{server}] {100 * quarters // QUARTERS}% ({shown})", flush=True)

    def _draw(self) -> None:
        assert self._widget is not None
        rows = []
        for server, done in self.done.items():
            total = self.total[server]
            bar = f'<progress value="{done}" max="{total}"></progress>' if total else "<progress></progress>"
            rows.append(
                f"<tr><td><b>{html.escape(server)}</b></td><td>{bar}</td>"
                f"<td>{size_text(done)} of {size_text(total)}</td></tr>"
            )
        self._widget.value = f"<b>{html.escape(self.title)}</b><table>{''.join(rows)}</table>"
