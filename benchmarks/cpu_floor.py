"""The CPU floor of a timed action: on this machine the servers (the fleet's containers) and the
orchestrator share the same cores, so an action cannot take less wall time than the CPU both
used for it, divided by the cores. The targets table of RESULTS.md shows it beside each timed
target: where the floor itself is above a target, the target is out of reach here, whatever the
code does with the time in between (issue 20 asks for the measurement that shows it).

The servers' CPU is each container's cgroup CPU time (cgroup v1 ``cpuacct.usage`` or v2
``cpu.stat``); the orchestrator's, this process's (every thread) and that of the child processes
it waited for meanwhile. Measuring processes started by bench.py find the containers in
``CGROUPS_VARIABLE``.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

CORES = os.cpu_count() or 1
CGROUPS_VARIABLE = "CRONIUM_BENCH_CGROUPS"


def usage_files(container_ids: Iterable[str]) -> list[Path]:
    """Each container's CPU usage file, where this machine's cgroups keep it; none at all if
    one of them cannot be found (a floor without some servers' CPU would claim too little)."""
    files = []
    for container in container_ids:
        candidates = (
            Path(f"/sys/fs/cgroup/cpuacct/docker/{container}/cpuacct.usage"),  # v1
            Path(f"/sys/fs/cgroup/system.slice/docker-{container}.scope/cpu.stat"),  # v2, systemd driver
            Path(f"/sys/fs/cgroup/docker/{container}/cpu.stat"),  # v2, cgroupfs driver
        )
        found = next((candidate for candidate in candidates if candidate.exists()), None)
        if found is None:
            return []
        files.append(found)
    return files


def _cpu_s(file: Path) -> float:
    text = file.read_text()
    if file.name == "cpuacct.usage":
        return int(text) / 1e9
    usage = next(line for line in text.splitlines() if line.startswith("usage_usec "))
    return int(usage.split()[1]) / 1e6


def _own_cpu_s() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class CpuFloor:
    """Measures the floor of each timed sample (``start`` and ``stop`` around it) over the given
    containers; ``floors`` holds one figure (seconds) per sample."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.floors: list[float] = []
        self._started: tuple[float, float] | None = None

    @classmethod
    def of_containers(cls, container_ids: Iterable[str]) -> CpuFloor:
        return cls(usage_files(container_ids))

    @classmethod
    def from_environment(cls) -> CpuFloor:
        """The containers bench.py named for its measuring processes (none: no floor)."""
        return cls([Path(p) for p in os.environ.get(CGROUPS_VARIABLE, "").split(os.pathsep) if p])

    def environment(self) -> dict[str, str]:
        """What a measuring process needs to find the same containers."""
        return {**os.environ, CGROUPS_VARIABLE: os.pathsep.join(str(f) for f in self.files)}

    def servers_cpu_s(self) -> float:
        return sum(_cpu_s(file) for file in self.files)

    def start(self) -> None:
        self._started = (self.servers_cpu_s(), _own_cpu_s())

    def stop(self) -> None:
        assert self._started is not None, "stop() without start()"
        servers, own = self._started
        used = self.servers_cpu_s() - servers + _own_cpu_s() - own
        self.floors.append(used / CORES)
        self._started = None

    def median(self) -> float | None:
        """The median floor in seconds; None where the containers' CPU cannot be read here."""
        return statistics.median(self.floors) if self.files and self.floors else None

    def extra(self) -> dict[str, float]:
        """The floor for a series' ``extra`` (milliseconds), if there is one."""
        floor = self.median()
        return {} if floor is None else {"cpu_floor_ms": floor * 1000}
