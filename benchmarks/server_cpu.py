"""Server CPU per warm run: what the runner session itself costs on the server for each run of
`true`, read from /proc (utime + stime of the session process, and of the script processes it
waited for), over many warm runs on one amd64 fleet server: first as the container is (a dozen
processes), then with --processes idle ones added, as on a real server (the runner's look for
a run's processes once cost in proportion to every process on the server).

Usage: python benchmarks/server_cpu.py [RUNS] [--processes N]   (needs `make fixtures runner`)
"""

from __future__ import annotations

import argparse
import os
import tempfile

from cronium_nb import Event, Executor, Fleet

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def session_times(fleet: Fleet, name: str) -> dict[str, tuple[int, int]]:
    """pid -> (own ticks, ticks of waited-for children) of every runner session on the server."""
    script = (
        "for p in $(pgrep -f 'cronium-runner (serve|daemon .*--session)'); do "
        'echo "$p $(cut -d")" -f2- /proc/$p/stat)"; done'
    )
    times = {}
    for line in fleet.exec(name, script).output.splitlines():
        pid, rest = line.split(" ", 1)
        fields = rest.split()  # after "(comm)": state is fields[0]; utime is field 14 of stat
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        times[pid] = (utime + stime, cutime + cstime)
    return times


def measure(fleet: Fleet, executor: Executor, name: str, event: Event, runs: int) -> None:
    processes = len(fleet.exec(name, "ls -d /proc/[0-9]*").output.split())
    before = session_times(fleet, name)
    for _ in range(runs):
        assert executor.run(event).ok
    after = session_times(fleet, name)
    shared = set(before) & set(after)
    own = sum(after[pid][0] - before[pid][0] for pid in shared)
    children = sum(after[pid][1] - before[pid][1] for pid in shared)
    print(f"{runs} warm runs of `true` on {len(shared)} runner session(s), {processes} processes on the server:")
    print(f"  runner session: {own / TICKS_PER_S / runs * 1000:.2f} ms of CPU per run")
    print(f"  the script (sh -c true) it started: {children / TICKS_PER_S / runs * 1000:.2f} ms per run")


def main(runs: int, processes: int) -> None:
    event = Event(name="cpu", script="true", type="sh")
    with Fleet.up(amd64=1, arm64=0) as fleet, tempfile.TemporaryDirectory() as state:
        name = fleet.names[0]
        with Executor(fleet.inventory, state_dir=state) as executor:
            for _ in range(5):  # warm: deployed, connected, a session open
                assert executor.run(event).ok
            measure(fleet, executor, name, event, runs)
            if processes:
                fleet.exec(name, f"for i in $(seq {processes}); do sleep 3600 & done >/dev/null 2>&1")
                measure(fleet, executor, name, event, runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=300)
    parser.add_argument("--processes", type=int, default=300, help="idle processes to add (0: none)")
    arguments = parser.parse_args()
    main(arguments.runs, arguments.processes)
