"""What an execution gives back: one ServerResult per server and the ExecutionResult around them
(its tables: summary, outputs and variables frames, logs; its HTML view; ``retry_failed()``)."""

from __future__ import annotations

import html
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cronium_nb.errors import ErrorKind
from cronium_nb.model import Status
from cronium_nb.store import Store
from cronium_nb.views import PHASE_COLOURS, PHASES, html_frontend, phase_legend, status_badge, style_table, timeline_bar

SUMMARY_COLUMNS = (
    "server", "arch", "status", "exit_code", "duration_s", "deploy", "attempts", "error", "error_kind", "worker",
)  # fmt: skip


@dataclass
class ServerResult:
    server: str
    status: Status = Status.PENDING
    arch: str | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    deploy: str | None = None  # "cached", "verified" or "deployed"
    attempts: int = 0  # deploy attempts made in this execution
    error: str | None = None
    error_kind: ErrorKind | None = None  # what kind of failure ``error`` is; see cronium_nb.errors
    outputs: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    phase: str | None = None  # while it runs: connect, deploy, run; None once finished
    helpers: str | None = None  # "bundled", "api", or "bundled (API unavailable: why)"
    worker: str | None = None  # through a Dask cluster: the worker's address; None for a local run

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SUMMARY_COLUMNS} | {"status": self.status.value}


def overall_status(results: list[ServerResult], *, cancelled: bool) -> Status:
    """SUCCESS (all), PARTIAL (some), TIMEOUT (all that failed timed out), CANCELLED, FAILED."""
    statuses = [r.status for r in results]
    if statuses and all(s == Status.SUCCESS for s in statuses):
        return Status.SUCCESS
    if cancelled:
        return Status.CANCELLED
    if any(s == Status.SUCCESS for s in statuses):
        return Status.PARTIAL
    if statuses and all(s == Status.TIMEOUT for s in statuses):
        return Status.TIMEOUT
    return Status.FAILED


class ExecutionResult:
    """The result of running one event on some servers.

    ``status``, ``summary`` (a DataFrame, one row per server), ``logs`` (a DataFrame read from
    the store), ``outputs`` and ``variables`` (dicts by server), ``result["web1"]``.
    """

    def __init__(
        self,
        execution_id: str,
        event_name: str,
        status: Status,
        servers: dict[str, ServerResult],
        store: Store,
        *,
        error: str | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.event_name = event_name
        self.status = status
        self.servers = servers
        self.error = error
        self._store = store
        self.retry_of: str | None = None  # the execution this one retried (retry_failed)
        # Set by the executor: reruns the given servers as a new execution linked to this one.
        self._rerun: Callable[[list[str], str], ExecutionResult] | None = None

    def __getitem__(self, server: str) -> ServerResult:
        try:
            return self.servers[server]
        except KeyError:
            raise KeyError(f"no server {server!r} in this execution; it ran on {', '.join(self.servers)}") from None

    def __iter__(self):
        return iter(self.servers.values())

    def __len__(self) -> int:
        return len(self.servers)

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([r.row() for r in self.servers.values()], columns=list(SUMMARY_COLUMNS))

    def _from_store(self, query: Callable[[Store], pd.DataFrame]) -> pd.DataFrame:
        """Run a query on the executor's store or, once the executor is closed, on the same file
        opened read-only (a property read must not migrate, recover or otherwise write)."""
        try:
            return query(self._store)
        except sqlite3.ProgrammingError:  # the executor was closed
            with Store.open_readonly(self._store.path.parent) as store:
                return query(store)

    @property
    def logs(self) -> pd.DataFrame:
        return self._from_store(lambda store: store.logs(self.execution_id))

    @property
    def tool_calls(self) -> pd.DataFrame:
        """The tool actions the scripts called (API mode): server, tool, started_at, duration_s,
        ok, error, arguments (None where they held a secret)."""
        return self._from_store(lambda store: store.tool_calls(self.execution_id))

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: r.outputs for name, r in self.servers.items()}

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        return {name: r.variables for name, r in self.servers.items()}

    @property
    def counts(self) -> dict[str, int]:
        """How many servers ended in each status (``{"success": 4, "failed": 2, ...}``)."""
        return dict(Counter(r.status.value for r in self.servers.values()))

    def outputs_frame(self) -> pd.DataFrame:
        """The outputs as a table, one row per server: a JSON object's keys become columns
        (nested objects flattened as ``a.b``, with :func:`pandas.json_normalize`); any other
        output (a string, number, list or nothing) goes into the column ``output``."""
        return _server_frame({name: r.outputs for name, r in self.servers.items()}, max_level=None)

    def variables_frame(self) -> pd.DataFrame:
        """The variables each server's run ended with, one row per server, a column per variable
        (values as they are, not flattened)."""
        return _server_frame({name: r.variables for name, r in self.servers.items()}, max_level=0)

    def retry_failed(self) -> ExecutionResult:
        """Run the same event, with the same input and options, again on the servers that did not
        succeed here (failed, timed out, cancelled or skipped), as a new execution linked to this
        one (its ``retry_of``, kept in the store); blocks like ``Executor.run``."""
        again = [name for name, r in self.servers.items() if r.status != Status.SUCCESS]
        if not again:
            raise ValueError(f"nothing to retry: every server of execution {self.execution_id} succeeded")
        if self._rerun is None:
            raise RuntimeError("this result was not made by an executor, so it cannot be retried")
        return self._rerun(again, self.execution_id)

    @property
    def phases(self) -> pd.DataFrame:
        """Seconds per phase (connect, deploy, upload, run, cleanup), one row per server."""
        rows = [{"server": name, **{p: r.phases.get(p) for p in PHASES}} for name, r in self.servers.items()]
        return pd.DataFrame(rows, columns=["server", *PHASES])

    def plot_timeline(self, ax: Any = None) -> Any:
        """A per-server timeline of the phases (connect, deploy, upload, run, cleanup), with
        matplotlib; returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _figure, ax = plt.subplots(figsize=(9, 0.6 * len(self.servers) + 1.2))
        colours = PHASE_COLOURS
        for row, result in enumerate(self.servers.values()):
            start = 0.0
            for phase in PHASES:
                seconds = result.phases.get(phase)
                if seconds:
                    ax.barh(row, seconds, left=start, color=colours[phase], label=phase if row == 0 else None)
                    start += seconds
        ax.set_yticks(range(len(self.servers)), labels=list(self.servers))
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"{self.event_name} — {self.status.value}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
        return ax

    def __repr__(self) -> str:
        counts = pd.Series([r.status.value for r in self.servers.values()]).value_counts().to_dict()
        return f"<ExecutionResult {self.event_name!r} {self.status.value} {counts} id={self.execution_id}>"

    def html(self) -> str:
        """The result as HTML, whatever the frontend: the status in colour, counts per status,
        one row per server (durations formatted, errors readable) with its phase timeline."""
        title = html.escape(f"{self.event_name} — execution {self.execution_id}")
        retry = f" (retry of {html.escape(self.retry_of)})" if self.retry_of else ""
        counts = ", ".join(f"{count} {html.escape(status)}" for status, count in self.counts.items())
        summary = self.summary
        longest = max((sum(r.phases.values()) for r in self.servers.values()), default=0.0)
        summary["timeline"] = [timeline_bar(r.phases, longest) for r in self.servers.values()]
        table = style_table(summary, html_columns=("timeline",)).to_html()
        error = f"<div style='color:#cf222e'>{html.escape(self.error)}</div>" if self.error else ""
        return (
            f"<div><strong>{title}</strong>{retry} {status_badge(self.status.value)} {counts}{error}{table}"
            f"<div style='font-size:11px'>timeline: {phase_legend()}</div></div>"
        )

    def _repr_html_(self) -> str | None:
        """HTML in a notebook shown by a frontend; None (plain text only) in a headless run."""
        return self.html() if html_frontend() else None


def _server_frame(values: dict[str, Any], *, max_level: int | None) -> pd.DataFrame:
    """One row per server: a dict's keys as columns (flattened up to ``max_level``), any other
    value in the column ``output``; a key named ``server`` becomes ``output.server``."""
    records = []
    for value in values.values():
        record = dict(value) if isinstance(value, dict) else {"output": value}
        if "server" in record:
            record["output.server"] = record.pop("server")
        records.append(record)
    frame = pd.json_normalize(records, max_level=max_level) if records else pd.DataFrame()
    frame.insert(0, "server", list(values))
    return frame
