"""Where B4's CPU goes: the 200 MB stream of B4, raw asyncssh against cronium_nb, with the CPU of
each part: on this side the event loop's thread and the store's thread, on the server the sshd
process, the runner session and the script (`yes | head`). Servers and orchestrator share the
machine's cores, so a stream cannot take less wall time than all of it divided by the cores.

Usage: python benchmarks/stream_cpu.py [RUNS]   (needs `make fixtures runner`)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import STREAM_COMMAND, _stream_raw  # the same stream and floor as B4
from cpu_floor import CpuFloor

from cronium_nb import Event, Executor, Fleet, Server

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def threads_cpu() -> dict[str, float]:
    """This process's threads: thread id -> CPU seconds so far."""
    seconds: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        seconds[task.name] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    return seconds


def by_rank(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This process's CPU in between, its threads by how busy they were (for ours: the event
    loop's, then the store's)."""
    used = sorted((after[tid] - before.get(tid, 0.0) for tid in after), reverse=True)
    return {"busiest thread": used[0], "second thread": sum(used[1:2]), "the other threads": sum(used[2:])}


def server_cpu(container: str) -> dict[str, float]:
    """The server's processes now: pid and name -> CPU seconds (their own, and of the children
    they waited for), and the container's whole CPU under "all"."""
    floor = CpuFloor.of_containers([container])
    seconds = {"all": floor.servers_cpu_s()}
    for pid in (floor.files[0].parent / "cgroup.procs").read_text().split():  # the cgroup's processes
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        name = "runner session" if b"--session" in command or b"serve" in command else Path(command[0].decode()).name
        seconds[f"{name} {pid}"] = sum(int(value) for value in fields[11:13]) / TICKS_PER_S
    return seconds


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's CPU in between, by part name (pids dropped, parts of one name added)."""
    parts: dict[str, float] = {}
    for key, value in after.items():
        name = key.rsplit(" ", 1)[0]
        parts[name] = parts.get(name, 0.0) + value - before.get(key, 0.0)
    return parts


def measure(label: str, container: str, action: Callable[[], object], runs: int) -> None:
    walls, rows = [], []
    for _ in range(runs):
        client, server, started = threads_cpu(), server_cpu(container), time.perf_counter()
        action()
        walls.append(time.perf_counter() - started)
        rows.append({**{f"here: {k}": v for k, v in by_rank(client, threads_cpu()).items()},
                     **{f"server: {k}": v for k, v in spent(server, server_cpu(container)).items()}})  # fmt: skip
    wall = statistics.median(walls)
    print(f"{label}: {wall:.2f} s ({200 / wall:.0f} MB/s), median of {runs}")
    total_here = statistics.median(sum(v for k, v in row.items() if k.startswith("here")) for row in rows)
    total_server = statistics.median(row["server: all"] for row in rows)
    for key in sorted({k for row in rows for k in row}):
        value = statistics.median(row.get(key, 0.0) for row in rows)
        if value >= 0.02 and key != "server: all":
            print(f"  {key:40s} {value:5.2f} s")
    print(f"  CPU here {total_here:.2f} s + servers {total_server:.2f} s = {total_here + total_server:.2f} s: "
          f"at least {(total_here + total_server) / CORES:.2f} s of wall on {CORES} cores")  # fmt: skip


def main(runs: int = 3) -> None:
    event = Event(name="bench-stream", script=STREAM_COMMAND, type="sh", timeout=600)
    with Fleet.up(amd64=1, arm64=0) as fleet, tempfile.TemporaryDirectory() as state:
        server: Server = fleet.servers[0]
        container = fleet.member(server.name).container_id
        measure("raw asyncssh", container, lambda: asyncio.run(_stream_raw(server)), runs)
        with Executor(state_dir=state) as executor:
            assert executor.run(event, [server]).ok  # deployed, connected, a session open
            measure("cronium_nb, every line stored", container, lambda: executor.run(event, [server]), runs)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
