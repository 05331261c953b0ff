"""What an execution gives back: one ServerResult per server and the ExecutionResult around them."""

from __future__ import annotations

import html
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cronium_nb.errors import ErrorKind
from cronium_nb.model import Status
from cronium_nb.store import Store

SUMMARY_COLUMNS = (
    "server", "arch", "status", "exit_code", "duration_s", "deploy", "attempts", "error", "error_kind", "worker",
)  # fmt: skip
PHASES = ("connect", "deploy", "upload", "run", "cleanup")


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
        colours = dict(zip(PHASES, ("#8c959f", "#bf8700", "#0969da", "#1a7f37", "#6e7781"), strict=True))
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

    def _repr_html_(self) -> str:
        title = html.escape(f"{self.event_name} — {self.status.value} — execution {self.execution_id}")
        # pandas-stubs omit DataFrame._repr_html_, so the attribute reads as a column (a Series).
        table = self.summary._repr_html_()  # type: ignore[operator]
        return f"<div><strong>{title}</strong>{table}</div>"
