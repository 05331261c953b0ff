"""``make soak``: a bounded run of repeated multi-server events with random faults.

Not part of ``make test``. It brings up 2 x amd64 + 1 x arm64 servers and, until the duration
ends (default 600 s), runs events one after the other while injecting at random one of: none,
a cancel, sshd killed on one server, one server paused past the keepalive bound, the runner
deleted from one server. For every execution it checks that each server's outcome is the one the
fault explains, that no process of the job and no work dir is left on any server, and it samples
the orchestrator's memory. The report goes to stdout and to ``test-artifacts/soak-report.txt``.

Usage: python tests/soak.py [--duration SECONDS] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from cronium_nb import Callbacks, Event, Executor, Fleet, SSHOptions, Status
from tests.runner_harness import leftover_processes, processes_matching

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FAULTS = ("none", "cancel", "kill_sshd", "pause", "delete_runner")
SCRIPT = "echo soak on $(hostname); sleep 10; echo done"  # `sleep 10` is the job's marker below
MARKER = r"sleep 10$|cronium-runner run\b"  # a run's script or one-shot runner
# While the executor is open its connections keep idle runner sessions: only once it is closed
# must they be gone too (leftover_processes counts them).
KEEPALIVE = SSHOptions(keepalive_interval=1, keepalive_count_max=3)  # a dead link is noticed in ~3-4 s
PAUSE_S = 8.0  # beyond that bound with room to spare, also for emulated arm64 under load


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def one_round(fleet: Fleet, executor: Executor, rng: random.Random, fault: str) -> tuple[dict, list[str]]:
    """Run one event with one fault; returns the expected-vs-actual tally and any problems."""
    victim = rng.choice(fleet.names)
    if fault == "delete_runner":
        fleet.exec(victim, "rm -rf ~/.cache/cronium/runner")
    started = threading.Event()  # the victim's script is running: the fault lands mid-run there

    def on_line(server: str, *_: object) -> None:
        if server == victim:
            started.set()

    job = executor.submit(Event(name="soak", script=SCRIPT, timeout=60), callbacks=Callbacks(on_line=on_line))
    problems: list[str] = []
    if not started.wait(90):
        problems.append("no output within 90 s")
    if fault == "cancel":
        job.cancel()
    elif fault == "kill_sshd":
        fleet.kill_sshd(victim)
    elif fault == "pause":
        fleet.pause(victim)
        time.sleep(PAUSE_S)  # the fault itself: a server frozen well past the keepalive bound
        fleet.unpause(victim)
    result = job.result(timeout=180)
    if fault == "kill_sshd":
        fleet.restart(victim)
    tally: Counter[str] = Counter()
    for name, server in result.servers.items():
        hit = name == victim
        if fault == "cancel":
            expected = Status.CANCELLED
        elif fault in ("kill_sshd", "pause") and hit:
            expected = Status.FAILED
        else:
            expected = Status.SUCCESS
        explained = server.status == expected and (
            expected != Status.FAILED or "connection" in (server.error or "").lower()
        )
        tally["attributed" if explained else "unexplained"] += 1
        if not explained:
            problems.append(f"{fault} on {victim}: {name} was {server.status.value} ({server.error})")
        if fault == "delete_runner" and hit and server.deploy != "deployed":
            problems.append(f"deleted runner on {name} was not redeployed ({server.deploy})")
    for name in fleet.names:
        if not wait_until(lambda n=name: not processes_matching(fleet, n, MARKER), timeout=30):
            tally["leaked_processes"] += 1
            problems.append(f"processes left on {name}: {processes_matching(fleet, name, MARKER)}")
        leftovers = fleet.exec(name, "ls -A ~/.cache/cronium/runs 2>/dev/null; ls -A ~/.cache/cronium/runner").output
        leaked = [entry for entry in leftovers.split() if entry.startswith(("run-", ".partial-"))]
        if leaked:
            tally["leaked_files"] += len(leaked)
            problems.append(f"files left on {name}: {leaked}")
    tally[f"status_{result.status.value}"] += 1
    return tally, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    problems: list[str] = []
    memory: list[tuple[float, float]] = []
    began = time.monotonic()
    with (
        Fleet.up(amd64=2, arm64=1) as fleet,
        tempfile.TemporaryDirectory() as state,
        Executor(fleet.inventory, state_dir=state, ssh_options=KEEPALIVE, deploy_backoff=(0.5, 1.0)) as executor,
    ):
        while time.monotonic() - began < args.duration:
            fault = rng.choice(FAULTS)
            faults[fault] += 1
            tally, found = one_round(fleet, executor, rng, fault)
            totals.update(tally)
            problems += found
            memory.append((time.monotonic() - began, rss_mb()))
            print(
                f"[{time.monotonic() - began:6.0f} s] {fault:14s} {dict(tally)} rss {memory[-1][1]:.0f} MB", flush=True
            )
        history = executor.history(limit=100_000)
        executor.close()
        for name in fleet.names:
            if not wait_until(lambda n=name: not leftover_processes(fleet, n, MARKER), timeout=30):
                totals["leaked_processes"] += 1
                problems.append(f"processes left on {name} after close: {leftover_processes(fleet, name, MARKER)}")
    executions = sum(faults.values())
    first = [mb for t, mb in memory if t <= memory[0][0] + 60]
    last = [mb for t, mb in memory if t >= memory[-1][0] - 60]
    growth = statistics.fmean(last) - statistics.fmean(first)
    lines = [
        f"soak: {args.duration:.0f} s, seed {args.seed}, {executions} executions on 3 servers (2 amd64, 1 arm64)",
        f"faults injected: {dict(faults)}",
        f"server outcomes explained by their fault: {totals['attributed']}; unexplained: {totals['unexplained']}",
        f"executions recorded in the store: {len(history)} of {executions}",
        f"leaked processes: {totals['leaked_processes']}; leaked files: {totals['leaked_files']}",
        f"orchestrator RSS: first minute {statistics.fmean(first):.0f} MB, last minute {statistics.fmean(last):.0f} MB "
        f"(growth {growth:+.0f} MB), max {max(mb for _, mb in memory):.0f} MB",
        *(f"problem: {problem}" for problem in problems),
    ]
    report = "\n".join(lines)
    print(report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak-report.txt").write_text(report + "\n")
    healthy = not problems and len(history) == executions and growth < 50
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
