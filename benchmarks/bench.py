"""cronium_nb against its peers, on one local fleet, in one run: ``make bench``.

B1 warm single-server latency, B2 fan-out, B3 cold deployment, B4 streaming (and reading the
2 million lines back), B5 where the time goes, B6 scale to 100 servers, B7 the fan-out through a
Dask cluster of 2 workers against the local executor. Every sample is checked (all servers
answered, every line arrived); the medians, the targets met or not, the machine,
the tool versions and the command go to ``benchmarks/RESULTS.md``, the raw samples to
``benchmarks/results/samples.csv`` and the plots to ``benchmarks/results/*.png``.

Usage: python benchmarks/bench.py [--quick] [--only B1,B2,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from cronium_nb import Callbacks, Event, Executor, Fleet, Server
from cronium_nb.ssh.options import PREFERRED_CIPHERS  # the floors use the ciphers we use

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import CpuFloor
from peers import AnsibleAdHoc, FabricGroup, ParallelSsh

if TYPE_CHECKING:
    from report import Report  # imported in main(): the measuring child processes need no matplotlib

HERE = Path(__file__).resolve().parent
RUNNER_DIST = HERE.parent / "runner" / "dist"
FANOUT_COMMAND = "hostname; uptime"
FANOUT_EXPECT = "load average"
STREAM_LINES = 2_000_000
STREAM_LINE = "0" * 99  # + newline: 100 bytes a line, 200 MB in all
STREAM_COMMAND = f"yes {STREAM_LINE} | head -n {STREAM_LINES}"


@dataclass
class Plan:
    """How many samples each benchmark takes (``--quick`` for a smoke run)."""

    latency_runs: int = 30
    fanout_sizes: Sequence[int] = (1, 5, 10, 20)
    fanout_runs: int = 10
    ansible_runs: int = 5
    deploy_sizes: Sequence[int] = (1, 10, 20)
    deploy_runs: int = 3
    stream_runs: int = 3
    profile_runs: int = 10
    scale_sizes: Sequence[int] = (20, 50, 100)
    scale_runs: int = 5
    cluster_sizes: Sequence[int] = (20, 60)
    cluster_runs: int = 5
    only: set[str] = field(default_factory=lambda: {"B1", "B2", "B3", "B4", "B5", "B6", "B7"})

    @classmethod
    def quick(cls) -> Plan:
        return cls(latency_runs=5, fanout_sizes=(1, 5), fanout_runs=2, ansible_runs=1, deploy_sizes=(1,),
                   deploy_runs=1, stream_runs=1, profile_runs=2, scale_sizes=(5, 10), scale_runs=1,
                   cluster_sizes=(4,), cluster_runs=2)  # fmt: skip

    def servers_needed(self) -> int:
        sizes = [*self.fanout_sizes, *self.deploy_sizes]
        if "B6" in self.only:
            sizes += self.scale_sizes
        if "B7" in self.only:
            sizes += self.cluster_sizes
        return max(sizes)


def timed(
    action: Callable[[], object],
    runs: int,
    prepare: Callable[[], object] | None = None,
    floor: CpuFloor | None = None,
) -> list[float]:
    """Seconds per run of ``action``; ``prepare`` runs before each, untimed; ``floor`` measures
    each run's CPU floor."""
    samples = []
    for _ in range(runs):
        if prepare is not None:
            prepare()
        if floor is not None:
            floor.start()
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
        if floor is not None:
            floor.stop()
    return samples


def floor_of(fleet: Fleet, servers: Sequence[Server]) -> CpuFloor:
    """A CPU floor meter over these servers' containers."""
    return CpuFloor.of_containers(fleet.member(server.name).container_id for server in servers)


def check(result, servers: Sequence[Server]) -> None:
    """An execution that did not succeed everywhere is a bug, not a sample."""
    if not result.ok or len(result) != len(servers):
        raise RuntimeError(f"execution failed:\n{result.summary().to_string()}")


# --- B1 ---------------------------------------------------------------------------------------


def _connect(server: Server, loop: asyncio.AbstractEventLoop) -> asyncssh.SSHClientConnection:
    return loop.run_until_complete(
        asyncssh.connect(
            server.host, port=server.port, username=server.user,
            client_keys=[server.key_path], known_hosts=server.known_hosts, encryption_algs=list(PREFERRED_CIPHERS),
        )
    )  # fmt: skip


def bench_latency(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    """The floor and cronium_nb take turns, sample by sample, so that the machine's moods hit
    both alike; parallel-ssh is measured after them (its client, idle between calls, slowed the
    others down when it took turns with them)."""
    server = fleet.servers[0]
    event = Event(name="bench-true", script="true", type="sh")
    loop = asyncio.new_event_loop()
    connection = _connect(server, loop)
    pssh = ParallelSsh([server])

    def floor() -> None:
        assert loop.run_until_complete(connection.run("true")).exit_status == 0

    with Executor(fleet.inventory, state_dir=state) as executor:
        tools = {
            "asyncssh run('true'), open connection": floor,
            "cronium_nb warm": lambda: check(executor.run(event, [server]), [server]),
        }
        for action in tools.values():  # deploy, warm up
            timed(action, 3)
        samples: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(plan.latency_runs):
            for name, action in tools.items():
                samples[name] += timed(action, 1)
        for name, taken in samples.items():
            report.add("B1", name, 1, taken)
        report.phases("B1 warm, 1 server", executor)
    pssh.run("true", "", new_client=False)
    report.add("B1", "parallel-ssh, client reused", 1,
               timed(lambda: pssh.run("true", "", new_client=False), plan.latency_runs))  # fmt: skip
    pssh.close()
    connection.close()
    loop.run_until_complete(connection.wait_closed())
    loop.close()


# --- B2 ---------------------------------------------------------------------------------------


def bench_fanout(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    event = Event(name="bench-fanout", script=FANOUT_COMMAND, type="sh")
    for n in plan.fanout_sizes:
        servers = fleet.servers[:n]
        with Executor(fleet.inventory, state_dir=state) as executor:  # runner deployed everywhere
            check(executor.run(event, servers), servers)

        def cold() -> None:
            with Executor(fleet.inventory, state_dir=state) as executor:
                check(executor.run(event, servers), servers)
                if n == max(plan.fanout_sizes):
                    report.phases(f"B2 cold connections, {n} servers", executor, keep_last=True)

        floor = floor_of(fleet, servers)
        report.add("B2", "cronium_nb, cold connections", n, timed(cold, plan.fanout_runs, floor=floor),
                   extra=floor.extra())  # fmt: skip
        with Executor(fleet.inventory, state_dir=state) as executor:
            check(executor.run(event, servers), servers)
            floor = floor_of(fleet, servers)
            report.add("B2", "cronium_nb, warm connections", n,
                       timed(lambda: check(executor.run(event, servers), servers), plan.fanout_runs, floor=floor),
                       extra=floor.extra())  # fmt: skip
            if n == max(plan.fanout_sizes):
                report.phases(f"B2 warm connections, {n} servers", executor)
        for tool in (ParallelSsh(servers), FabricGroup(servers)):
            try:
                for new_client, label in ((True, "new client"), (False, "connections reused")):
                    tool.run(FANOUT_COMMAND, FANOUT_EXPECT, new_client=new_client)  # warm-up
                    floor = floor_of(fleet, servers)
                    samples = timed(lambda: tool.run(FANOUT_COMMAND, FANOUT_EXPECT, new_client=new_client),
                                    plan.fanout_runs, floor=floor)  # fmt: skip
                    report.add("B2", f"{tool.name}, {label}", n, samples, extra=floor.extra())
            finally:
                tool.close()
        ansible = AnsibleAdHoc(servers)
        try:
            ansible.run(FANOUT_COMMAND, FANOUT_EXPECT)  # starts the ControlPersist masters
            report.add("B2", "Ansible ad-hoc, ControlPersist", n,
                       timed(lambda: ansible.run(FANOUT_COMMAND, FANOUT_EXPECT), plan.ansible_runs))  # fmt: skip
        finally:
            ansible.close()


# --- B3 ---------------------------------------------------------------------------------------


def bench_deploy(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    """Cold deployment: the runner removed from every server, then one event deploys and runs."""
    event = Event(name="bench-deploy", script="true", type="sh")
    for n in plan.deploy_sizes:
        servers = fleet.servers[:n]
        sent: list[int] = []

        def remove_runner() -> None:
            for server in servers:
                fleet.exec(server.name, "pkill -f 'cronium-runner [d]aemon'; rm -rf /root/.cache/cronium")

        def deploy() -> None:
            with Executor(fleet.inventory, state_dir=state) as executor:
                result = executor.run(event, servers)
                check(result, servers)
                states = {r.deploy for r in result.servers.values()}
                if states != {"deployed"}:
                    raise RuntimeError(f"expected a fresh deployment on every server, got {states}")
                metrics = executor.metrics().set_index("metric")["value"]
                sent.append(int(metrics["deployments.bytes_sent"]))

        floor = floor_of(fleet, servers)
        samples = timed(deploy, plan.deploy_runs, remove_runner, floor=floor)
        report.add("B3", "cronium_nb deploy, static binary", n, samples,
                   extra={"bytes_sent": statistics.median(sent), **floor.extra()})  # fmt: skip


# --- B4 ---------------------------------------------------------------------------------------


def _status_mb(field: str = "VmHWM") -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _stream_raw(server: Server) -> int:
    async with asyncssh.connect(
        server.host, port=server.port, username=server.user,
        client_keys=[server.key_path], known_hosts=server.known_hosts, encryption_algs=list(PREFERRED_CIPHERS),
    ) as connection:  # fmt: skip
        process = await connection.create_process(STREAM_COMMAND, encoding=None)
        lines = 0
        while data := await process.stdout.read(65536):
            lines += data.count(b"\n")
        await process.wait()
        return lines


def _stream_ours(server: Server, state: str, floor: CpuFloor) -> tuple[int, float, float, float]:
    """Lines stored, seconds to stream them, the peak RSS while streaming (MB) and the seconds
    ``res.logs`` takes to give them back (after the peak was taken: 2 million lines in a
    DataFrame are several hundred MB of their own, which is reading, not streaming)."""
    event = Event(name="bench-stream", script=STREAM_COMMAND, type="sh", timeout=600)
    with Executor(state_dir=state) as executor:
        check(executor.run(event, [server]), [server])  # deploy first: B4 measures streaming
        floor.start()
        started = time.perf_counter()
        result = executor.run(event, [server])
        elapsed = time.perf_counter() - started
        floor.stop()
        check(result, [server])
        stored = executor.store._query(
            "SELECT SUM(line_count) FROM log_chunks WHERE execution_id = ?", (result.execution_id,)
        )[0][0]  # fmt: skip
        streaming_peak = _status_mb()
        started = time.perf_counter()
        logs = result.logs
        read_back = time.perf_counter() - started
        if len(logs) != stored:
            raise RuntimeError(f"res.logs gave {len(logs)} of {stored} stored lines")
        return stored, elapsed, streaming_peak, read_back


def stream_child(tool: str, server_json: str, state: str) -> None:
    """One B4 measurement in its own process, so that its peak RSS is its own."""
    server = Server(**json.loads(server_json))
    floor = CpuFloor.from_environment()
    read_back = None
    if tool == "raw":
        floor.start()
        started = time.perf_counter()
        lines = asyncio.run(_stream_raw(server))
        elapsed = time.perf_counter() - started
        floor.stop()
        peak = _status_mb()
    else:
        lines, elapsed, peak, read_back = _stream_ours(server, state, floor)
    print(json.dumps({"lines": lines, "seconds": elapsed, "peak_rss_mb": peak, "read_back_s": read_back,
                      "cpu_floor_s": floor.median()}))  # fmt: skip


def bench_streaming(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    server = fleet.servers[0]
    megabytes = STREAM_LINES * (len(STREAM_LINE) + 1) / 1e6
    containers = floor_of(fleet, [server])
    for tool, label in (("raw", "asyncssh read(65536), open connection"), ("ours", "cronium_nb (stored, lines)")):
        seconds, rss, read_back, floors = [], [], [], []
        for _ in range(plan.stream_runs):
            child = subprocess.run(
                [sys.executable, __file__, "--stream-child", tool, json.dumps(server.__dict__), str(state)],
                capture_output=True, text=True, timeout=900, env=containers.environment(),
            )  # fmt: skip
            if child.returncode != 0:
                raise RuntimeError(f"{label}: the measuring process failed:\n{child.stderr[-2000:]}")
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            if measured["lines"] != STREAM_LINES:
                raise RuntimeError(f"{label}: {measured['lines']} of {STREAM_LINES} lines arrived")
            seconds.append(measured["seconds"])
            rss.append(measured["peak_rss_mb"])
            if measured["read_back_s"] is not None:
                read_back.append(measured["read_back_s"])
            if measured["cpu_floor_s"] is not None:
                floors.append(measured["cpu_floor_s"])
        extra = {"mb_per_s": megabytes / statistics.median(seconds), "peak_rss_mb": max(rss)}
        if floors:
            extra["cpu_floor_ms"] = statistics.median(floors) * 1000
        if read_back:
            extra["logs_read_s"] = statistics.median(read_back)
        report.add("B4", label, 1, seconds, extra=extra)


# --- B6 ---------------------------------------------------------------------------------------


COLD_LABEL = "cronium_nb, cold connections (runner cached)"


def scale_child(servers_json: str, state: str, runs: str) -> None:
    """One B6 size in its own process: cold fan-outs (a new executor each, runner cached), then
    warm ones on one executor; the orchestrator's CPU per server and its resident memory with
    every connection open."""
    servers = [Server(**data) for data in json.loads(servers_json)]
    event = Event(name="bench-fanout", script=FANOUT_COMMAND, type="sh")
    with Executor(state_dir=state) as executor:  # deploy where needed, untimed
        check(executor.run(event, servers), servers)
    cpu = lambda: time.process_time()  # noqa: E731 - all threads of this process

    def cold() -> None:
        with Executor(state_dir=state) as executor:
            check(executor.run(event, servers), servers)

    cold_floor, warm_floor = CpuFloor.from_environment(), CpuFloor.from_environment()
    cpu_before = cpu()
    cold_samples = timed(cold, int(runs), floor=cold_floor)
    cold_cpu = (cpu() - cpu_before) / int(runs)
    with Executor(state_dir=state) as executor:
        check(executor.run(event, servers), servers)
        cpu_before = cpu()
        warm_samples = timed(lambda: check(executor.run(event, servers), servers), int(runs), floor=warm_floor)
        warm_cpu = (cpu() - cpu_before) / int(runs)
        rss_mb = _status_mb("VmRSS")
    floors = {"cold_floor": cold_floor.extra(), "warm_floor": warm_floor.extra()}
    print(json.dumps({"cold": cold_samples, "warm": warm_samples, "cold_cpu_s": cold_cpu, "warm_cpu_s": warm_cpu,
                      "rss_mb": rss_mb, **floors}))  # fmt: skip


def bench_scale(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    for n in plan.scale_sizes:
        servers = fleet.servers[:n]
        child = subprocess.run(
            [sys.executable, __file__, "--scale-child", json.dumps([s.__dict__ for s in servers]), str(state),
             str(plan.scale_runs)], capture_output=True, text=True, timeout=1800,
            env=floor_of(fleet, servers).environment(),
        )  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(f"B6 at {n} servers: the measuring process failed:\n{child.stderr[-2000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        for kind, label in (("cold", COLD_LABEL), ("warm", "cronium_nb, warm connections")):
            extra = {"rss_mb": measured["rss_mb"], "cpu_ms_per_server": measured[f"{kind}_cpu_s"] * 1000 / n}
            report.add("B6", label, n, measured[kind], extra={**extra, **measured[f"{kind}_floor"]})


# --- B7 ---------------------------------------------------------------------------------------

CLUSTER_WORKERS = 2


def bench_cluster(report: Report, fleet: Fleet, state: Path, plan: Plan) -> None:
    """The same fan-out through a Dask LocalCluster of 2 worker processes (no sites: the servers
    are spread over both) and with the local executor, cold (a new executor: for the cluster,
    new agents on the workers, new connections) and warm, in one run."""
    from distributed import Client

    from cronium_nb.cluster.local import local_cluster

    event = Event(name="bench-fanout", script=FANOUT_COMMAND, type="sh")

    def check_spread(result, servers: Sequence[Server]) -> None:
        check(result, servers)
        workers = set(result.summary["worker"])
        if len(workers) != min(CLUSTER_WORKERS, len(servers)) or None in workers:
            raise RuntimeError(f"expected the servers spread over {CLUSTER_WORKERS} workers, got {workers}")

    with local_cluster([None] * CLUSTER_WORKERS) as cluster, Client(cluster) as client:
        client.wait_for_workers(CLUSTER_WORKERS, timeout=120)
        paths = {"local executor": {}, f"through a Dask cluster ({CLUSTER_WORKERS} workers)": {"cluster": client}}
        for n in plan.cluster_sizes:
            servers = fleet.servers[:n]
            with Executor(fleet.inventory, state_dir=state) as executor:  # runner deployed everywhere
                check(executor.run(event, servers), servers)
            for label, options in paths.items():
                checked = check_spread if options else check

                def cold() -> None:
                    with Executor(fleet.inventory, state_dir=state, **options) as executor:
                        checked(executor.run(event, servers), servers)

                report.add("B7", f"{label}, cold", n, timed(cold, plan.cluster_runs))
                lateness: list[float] = []  # a line's arrival here after its server's runner read it

                def on_line(server: str, stream: str, text: str, ts: float) -> None:
                    lateness.append(time.time() - ts)

                with Executor(fleet.inventory, state_dir=state, **options) as executor:
                    checked(executor.run(event, servers), servers)
                    warm = timed(lambda: checked(executor.run(event, servers, callbacks=Callbacks(on_line=on_line)),
                                                 servers), plan.cluster_runs)  # fmt: skip
                    report.add("B7", f"{label}, warm", n, warm,
                               extra={"line_delay_ms": statistics.median(lateness) * 1000})  # fmt: skip


# --- profile ----------------------------------------------------------------------------------


PROFILES = {
    "cold": "cold fan-out to {n} servers, {runs} times (a new executor each)",
    "warm": "warm fan-out to {n} servers, {runs} times (one executor)",
    "stream": "B4 streaming, 200 MB of lines from one server, {runs} times",
}


def profile_child(kind: str, servers_json: str, state: str, runs: str) -> None:
    """The work of one profile (``PROFILES``) in a loop, for py-spy to sample (see profile)."""
    servers = [Server(**data) for data in json.loads(servers_json)]
    fanout = Event(name="bench-fanout", script=FANOUT_COMMAND, type="sh")
    stream = Event(name="bench-stream", script=STREAM_COMMAND, type="sh", timeout=600)
    if kind == "cold":
        for _ in range(int(runs)):
            with Executor(state_dir=state) as executor:
                check(executor.run(fanout, servers), servers)
        return
    with Executor(state_dir=state) as executor:
        check(executor.run(fanout, servers), servers)  # connected, warm
        for _ in range(int(runs)):
            check(executor.run(stream if kind == "stream" else fanout, servers), servers)


def profile(report: Report, fleet: Fleet, state: Path, kind: str, n: int, runs: int) -> None:
    """Where the orchestrator's CPU goes (py-spy samples every thread of a child process)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    servers = fleet.servers[:n]
    label = PROFILES[kind].format(n=n, runs=runs) + " (py-spy, all threads)"
    with Executor(fleet.inventory, state_dir=state) as executor:  # deploy first where B3 did not
        check(executor.run(Event(name="bench-fanout", script=FANOUT_COMMAND, type="sh"), servers), servers)
    with tempfile.TemporaryDirectory() as out:
        stacks = Path(out) / "stacks.txt"
        child = [sys.executable, __file__, "--profile-child", kind, json.dumps([s.__dict__ for s in servers]),
                 str(state), str(runs)]  # fmt: skip
        completed = subprocess.run(
            [str(py_spy), "record", "--format", "raw", "--rate", "250", "--subprocesses", "-o", str(stacks),
             "--", *child], capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if completed.returncode != 0 or not stacks.exists():
            report.profile_errors.append((label, (completed.stderr or completed.stdout)[-1000:]))
            return
        report.add_profile(label, stacks.read_text())


# --- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not for RESULTS.md")
    parser.add_argument("--only", help="comma-separated subset of B1,B2,B3,B4,B5,B6,B7")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and results/ go")
    parser.add_argument("--stream-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--scale-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_child:
        stream_child(*args.stream_child)
        return
    if args.profile_child:
        profile_child(*args.profile_child)
        return
    if args.scale_child:
        scale_child(*args.scale_child)
        return
    from report import Report

    plan = Plan.quick() if args.quick else Plan()
    if args.only:
        plan.only = {part.strip().upper() for part in args.only.split(",")}
    servers_needed = plan.servers_needed()
    command = "make bench" + (f" BENCH_ARGS='{' '.join(argv or sys.argv[1:])}'" if (argv or sys.argv[1:]) else "")
    report = Report(command=command, quick=args.quick)
    started = time.monotonic()
    print(f"bench: starting {servers_needed} amd64 sshd containers", flush=True)
    with Fleet.up(amd64=servers_needed, arm64=0) as fleet, tempfile.TemporaryDirectory() as state:
        for name, bench in (("B1", bench_latency), ("B2", bench_fanout), ("B3", bench_deploy),
                            ("B4", bench_streaming), ("B6", bench_scale), ("B7", bench_cluster)):  # fmt: skip
            if name in plan.only:
                print(f"bench: {name}", flush=True)
                bench(report, fleet, Path(state), plan)
        if "B5" in plan.only:
            print("bench: B5 profiles", flush=True)
            profile(report, fleet, Path(state), "cold", min(10, servers_needed), plan.profile_runs)
            if "B6" in plan.only:
                profile(report, fleet, Path(state), "warm", max(plan.scale_sizes), 3 * plan.profile_runs)
            if "B4" in plan.only:
                profile(report, fleet, Path(state), "stream", 1, plan.stream_runs)
    report.duration_s = time.monotonic() - started
    report.write(args.out)
    print(f"bench: done in {report.duration_s:.0f} s; wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
