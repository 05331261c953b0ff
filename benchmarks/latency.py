"""Single-server latency of `true`: warm (pooled connection, cached runner) and cold (a new
executor: new connection, runner verified on the server), against raw asyncssh.

Usage: python benchmarks/latency.py [RUNS] [ARCH]   (default 20 runs on amd64; needs the fixtures)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time

import asyncssh

from cronium_nb import Event, Executor, Fleet
from cronium_nb.results import PHASES


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.1f} ms (min {min(samples) * 1000:.1f})"


async def raw_floor(server, runs: int) -> list[float]:
    async with asyncssh.connect(
        server.host, port=server.port, username=server.user,
        client_keys=[server.key_path], known_hosts=server.known_hosts,
    ) as connection:  # fmt: skip
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            await connection.run("true")
            samples.append(time.perf_counter() - started)
        return samples


def main(runs: int = 20, arch: str = "amd64") -> None:
    counts = {"amd64": 1, "arm64": 0} if arch == "amd64" else {"amd64": 0, "arm64": 1}
    event = Event(name="bench-true", script="true", type="sh")
    with Fleet.up(**counts, variant="bare") as fleet, tempfile.TemporaryDirectory() as state:
        server = fleet.servers[0]
        raw = asyncio.run(raw_floor(server, runs))
        with Executor(fleet.inventory, state_dir=state) as warm_executor:
            warm_executor.run(event)  # deploy once
            warm = []
            for _ in range(runs):
                started = time.perf_counter()
                assert warm_executor.run(event).ok
                warm.append(time.perf_counter() - started)
            phases = warm_executor.metrics().set_index("metric")["value"]
        cold = []
        for _ in range(runs):
            started = time.perf_counter()
            with Executor(fleet.inventory, state_dir=state) as executor:
                assert executor.run(event).ok
            cold.append(time.perf_counter() - started)
    print(f"{arch}, median of {runs}:")
    print(f"  raw asyncssh run('true') on an open connection {median_ms(raw)}")
    print(f"  executor warm (pooled, runner cached)          {median_ms(warm)}")
    print(f"  executor cold (new executor: connect, verify)  {median_ms(cold)}")
    p50 = {p: phases.get(f"phase.{p}.p50_s", float("nan")) * 1000 for p in PHASES}
    print("  warm phases p50: " + ", ".join(f"{phase} {ms:.1f} ms" for phase, ms in p50.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, sys.argv[2] if len(sys.argv) > 2 else "amd64")
