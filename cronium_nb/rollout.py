"""Safe rollouts: working through the targets in batches, stopping past a failure limit, and the
dry-run plan of an execution.

:class:`Rollout` is the policy of ``run(..., batch_size=N, max_fail=K)``: the targets go in
batches of ``N`` (in the order given); before each next batch, once more than ``K`` servers failed
(``K`` a count, or a fraction ``0 < K < 1`` of the targets), the rollout stops and the servers not
started are marked ``skipped``. :class:`Plan` is what ``ex.plan(event, servers)`` (and
``%%cronium --dry-run``) gives: the resolved targets, the payload manifest and checksum, and what
this machine knows about each server's runner cache, found without contacting any server.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from cronium_nb.errors import ConnectError, CroniumError, DeployError
from cronium_nb.model import Event, Server, Status
from cronium_nb.payload import build_archive
from cronium_nb.ssh.deploy import HostInfo
from cronium_nb.views import html_frontend, style_table

if TYPE_CHECKING:
    from cronium_nb.ssh.deploy import RunnerBuilds
    from cronium_nb.ssh.resolve import Target
    from cronium_nb.store import Store

T = TypeVar("T")

# What a server counts as when deciding whether to stop: anything that did not succeed.
NOT_SUCCEEDED = (Status.FAILED, Status.TIMEOUT, Status.CANCELLED, Status.SKIPPED, Status.INTERRUPTED)


class RolloutError(CroniumError, ValueError):
    """A ``batch_size`` or ``max_fail`` that cannot work, found before anything runs."""


@dataclass(frozen=True)
class Rollout:
    """Batches of ``batch_size`` servers (None: all at once); stop before the next batch once more
    than ``max_fail`` servers failed (an int count, or a fraction of the targets; None: never)."""

    batch_size: int | None = None
    max_fail: int | float | None = None

    def __post_init__(self) -> None:
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise RolloutError(f"batch_size must be a whole number of servers, 1 or more, got {size!r}")
        limit = self.max_fail
        if limit is None:
            return
        if size is None:
            raise RolloutError(
                "max_fail needs a batch_size: without batches every server starts at once, so there is "
                "nothing left to stop"
            )
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise RolloutError(f"max_fail must be a count (int) or a fraction between 0 and 1, got {limit!r}")
        if isinstance(limit, int) and limit < 0:
            raise RolloutError(f"max_fail must be 0 or more servers, got {limit}")
        if isinstance(limit, float) and not 0 < limit < 1:
            raise RolloutError(
                f"max_fail as a fraction must be between 0 and 1 (exclusive), got {limit!r}; "
                "give a count of servers as an int"
            )

    @property
    def active(self) -> bool:
        """Whether this changes anything compared to running every server at once."""
        return self.batch_size is not None or self.max_fail is not None

    def batches(self, targets: Sequence[T]) -> list[list[T]]:
        """``targets`` cut into batches, in order (one batch when there is no batch size)."""
        size = self.batch_size or max(len(targets), 1)
        return [list(targets[start : start + size]) for start in range(0, len(targets), size)]

    def failure_limit(self, total: int) -> float:
        """How many failed servers are tolerated among ``total`` targets (infinite: no limit)."""
        if self.max_fail is None:
            return float("inf")
        if isinstance(self.max_fail, float):
            return self.max_fail * total
        return float(self.max_fail)

    def should_stop(self, failed: int, total: int) -> bool:
        """True once more than the limit failed: the batches not started yet are skipped."""
        return failed > self.failure_limit(total)

    def skip_reason(self, failed: int, total: int, batch: int, batches: int) -> str:
        """The ``error`` of a skipped server: why it ran nothing."""
        limit = self.max_fail if isinstance(self.max_fail, int) else f"{self.max_fail:g} of {total}"
        return (
            f"skipped: the rollout stopped after batch {batch} of {batches}: {failed} server(s) did not "
            f"succeed, more than max_fail={limit}"
        )

    def options(self) -> dict[str, Any]:
        """What the store keeps with the execution's options."""
        return {"batch_size": self.batch_size, "max_fail": self.max_fail} if self.active else {}


DEFAULT_CONFIRM_ABOVE = 20  # a %%cronium cell aimed at more servers asks first (Executor.confirm_above)
PLAN_COLUMNS = (
    "server", "batch", "host", "port", "user", "jump", "arch", "runner", "runner_cached", "runner_checked_at", "error",
)  # fmt: skip


@dataclass
class Plan:
    """What an execution would do, found without contacting any server.

    ``targets`` (a DataFrame, one row per server, in the order they would run, with ``batch``):
    the connection each resolves to (host, port, user, jump chain), the architecture the store
    remembers from the last probe (None: never probed), the runner build that would be used,
    and ``runner_cached``: True when this machine recorded that build as in place on that
    server (at ``runner_checked_at``), False when the server was probed but that build never
    recorded there, None when unknown. It is the orchestrator's record, not a look at the
    server (which may have lost the file since: a run then deploys again).
    ``manifest`` and ``checksum``/``payload_size``: the payload that would be shipped.
    """

    event_name: str
    targets: pd.DataFrame
    manifest: dict[str, Any]
    checksum: str
    payload_size: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def servers(self) -> list[str]:
        return list(self.targets["server"])

    def __repr__(self) -> str:
        lines = [
            f"<Plan {self.event_name!r}: {len(self.targets)} server(s), nothing sent>",
            f"payload sha256 {self.checksum} ({self.payload_size} bytes)",
            f"manifest {json.dumps(self.manifest, sort_keys=True)}",
        ]
        if self.options:
            lines.append(f"options {json.dumps(self.options, sort_keys=True)}")
        lines.append(self.targets.to_string(index=False))
        return "\n".join(lines)

    def _repr_html_(self) -> str | None:
        return self.html() if html_frontend() else None

    def html(self) -> str:
        """The plan as HTML, whatever the frontend."""
        manifest = html.escape(json.dumps(self.manifest, indent=1, sort_keys=True))
        options = f"<br>options: <code>{html.escape(json.dumps(self.options))}</code>" if self.options else ""
        table = style_table(self.targets).to_html()
        return (
            f"<div><strong>dry run: {html.escape(self.event_name)}</strong> — {len(self.targets)} server(s), "
            f"nothing sent<br>payload sha256 <code>{self.checksum}</code> ({self.payload_size} bytes){options}"
            f"<details><summary>manifest</summary><pre>{manifest}</pre></details>{table}</div>"
        )


def make_plan(
    event: Event,
    targets: Sequence[Server],
    rollout: Rollout,
    resolve: Callable[[Server], Target],
    builds: RunnerBuilds,
    store: Store,
) -> Plan:
    """The :class:`Plan` of running ``event`` on ``targets``: each resolved through the ssh
    config (``resolve``: local files only), its architecture and runner as the store remembers
    them, and the payload built here (the same bytes a run ships; nothing is recorded)."""
    archive = build_archive(event.manifest(), event.script)
    rows = []
    for batch_number, batch in enumerate(rollout.batches(targets), 1):
        for server in batch:
            row: dict[str, Any] = {"server": server.name, "batch": batch_number}
            try:
                target = resolve(server)
            except ConnectError as error:
                rows.append(row | {"host": server.host, "error": str(error)})
                continue
            row |= {
                "host": target.host,
                "port": target.port,
                "user": target.user,
                "jump": ",".join(hop.address for hop in target.chain) or None,
            }
            facts = store.host_facts(target.route)
            if facts is None:  # never probed from here: its architecture, and so its build, unknown
                rows.append(row)
                continue
            info = HostInfo.from_facts(facts)
            row["arch"] = info.machine
            try:
                build = builds.choose(info)
            except DeployError as error:
                rows.append(row | {"error": str(error)})
                continue
            checked_at = store.runner_recorded(target.route, build.remote_name)
            row |= {"runner": build.remote_name, "runner_cached": checked_at is not None}
            if checked_at is not None:
                row["runner_checked_at"] = pd.Timestamp(checked_at, unit="s", tz="UTC")
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(PLAN_COLUMNS)).astype({"runner_cached": object})
    frame["runner_cached"] = [None if pd.isna(value) else bool(value) for value in frame["runner_cached"]]
    return Plan(event.name, frame, event.manifest().to_dict(), archive.sha256, archive.size,
                rollout.options())  # fmt: skip
