"""An executor's counters and per-phase durations, as ``ex.metrics()`` shows them."""

from __future__ import annotations

import statistics
from collections import Counter, deque

import pandas as pd

from cronium_nb.model import Status
from cronium_nb.results import PHASES, ServerResult


class Metrics:
    """Counters and per-phase durations of one executor."""

    def __init__(self, samples: int = 10_000) -> None:
        self.executions: Counter[str] = Counter()
        self.deployments: Counter[str] = Counter()
        self.phases: dict[str, deque[float]] = {phase: deque(maxlen=samples) for phase in PHASES}
        self.bytes_deployed = 0

    def record_deploy(self, state: str, bytes_sent: int = 0) -> None:
        """One deployment's outcome: ``cached``, ``verified``, ``deployed`` or ``failed``."""
        self.deployments[state] += 1
        self.bytes_deployed += bytes_sent

    def record_server(self, result: ServerResult) -> None:
        for phase, seconds in result.phases.items():
            self.phases[phase].append(seconds)

    def frame(self) -> pd.DataFrame:
        rows: list[tuple[str, float]] = [("executions.total", sum(self.executions.values()))]
        rows += [(f"executions.{s.value}", self.executions[s.value]) for s in RESULT_STATUSES]
        total = sum(self.deployments.values())
        cached = self.deployments["cached"] + self.deployments["verified"]
        rows += [
            ("deployments.total", total),
            ("deployments.success", self.deployments["deployed"]),
            ("deployments.failed", self.deployments["failed"]),
            ("deployments.cached", cached),
            ("deployments.cache_hit_rate", cached / total if total else float("nan")),
            ("deployments.bytes_sent", self.bytes_deployed),
        ]
        for phase, samples in self.phases.items():
            values = sorted(samples)
            rows.append((f"phase.{phase}.count", len(values)))
            if values:
                rows += [
                    (f"phase.{phase}.mean_s", statistics.fmean(values)),
                    (f"phase.{phase}.p50_s", statistics.median(values)),
                    (f"phase.{phase}.max_s", values[-1]),
                ]
        # object dtype keeps counts as integers next to the float durations
        return pd.DataFrame({"metric": [m for m, _ in rows], "value": pd.Series([v for _, v in rows], dtype=object)})


RESULT_STATUSES = (Status.SUCCESS, Status.PARTIAL, Status.FAILED, Status.TIMEOUT, Status.CANCELLED)
