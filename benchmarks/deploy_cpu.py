"""Where a cold deployment's CPU goes: the servers' (their containers' cgroup CPU time) and the
orchestrator's, per server, for a cold deployment (B3's case), a run on new connections with the
runner cached, and an SSH connection alone; then the fan-out of B2 and B6 (`hostname; uptime`)
on new connections and on warm ones, ours against parallel-ssh's and Fabric's (what the servers
pay for each tool: on this machine they share the orchestrator's 2 cores) and against a bare
exec on new connections, with and without the runner binary started (the least a run through a
runner could cost); then, on one server,
each deploy step on its own.

Usage: python benchmarks/deploy_cpu.py [SERVERS]   (needs `make fixtures runner`)
"""

from __future__ import annotations

import asyncio
import gzip
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh

from cronium_nb import Event, Executor, Fleet
from cronium_nb.resources import runner_dist
from cronium_nb.ssh.deploy import INSTALL_SCRIPT, HostInfo, RunnerBuilds, remote_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import CpuFloor
from peers import FabricGroup, ParallelSsh

EVENT = Event(name="deploy-cpu", script="true", type="sh")
FANOUT = Event(name="bench-fanout", script="hostname; uptime", type="sh")
REMOVE_RUNNER = "pkill -f 'cronium-runner [d]aemon'; rm -rf ~/.cache/cronium"


def server_cpu_s(fleet: Fleet, names: list[str]) -> float:
    """CPU seconds the servers' containers have used so far."""
    return CpuFloor.of_containers(fleet.member(name).container_id for name in names).servers_cpu_s()


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(label: str, fleet: Fleet, names: list[str], action: Callable[[], object]) -> None:
    servers, mine, wall = server_cpu_s(fleet, names), own_cpu_s(), time.perf_counter()
    action()
    wall = time.perf_counter() - wall
    servers, mine = server_cpu_s(fleet, names) - servers, own_cpu_s() - mine
    n = len(names)
    print(f"{label:42s} wall {wall * 1000:6.0f} ms   per server: servers {servers * 1000 / n:5.1f} ms CPU, "
          f"orchestrator {mine * 1000 / n:5.1f} ms CPU", flush=True)  # fmt: skip


async def connect_all(fleet: Fleet, names: list[str]) -> list[asyncssh.SSHClientConnection]:
    servers = [fleet.inventory[name] for name in names]
    return await asyncio.gather(
        *(
            asyncssh.connect(s.host, port=s.port, username=s.user, client_keys=[s.key_path], known_hosts=s.known_hosts)
            for s in servers
        )
    )


async def connect_and_close(fleet: Fleet, names: list[str], command: str | None = None) -> None:
    """New connections to every server, each running ``command`` (if any) once, then closed."""
    for connection in await connect_all(fleet, names):
        if command is not None:
            assert (await connection.run(command, check=False)).exit_status == 0
        connection.close()
        await connection.wait_closed()


async def steps(fleet: Fleet, name: str) -> None:
    """Each step of a cold deployment on one server, 5 times: its servers' CPU."""
    builds = RunnerBuilds(runner_dist())
    build = builds.choose(HostInfo("x86_64"))
    data = build.upload()
    (connection,) = await connect_all(fleet, [name])
    cases = [
        ("exec ':' (a channel, a shell)", ":", None),
        ("probe", builds.probe_command(), None),
        ("install", remote_script(INSTALL_SCRIPT, build), data),
        ("receive the upload (cat)", "cat > /dev/null", data),
        ("decompress it (gzip -dc)", "gzip -dc > /dev/null", data),
        ("receive it uncompressed (cat)", "cat > /dev/null", gzip.decompress(data)),  # the road not taken
        ("sha256sum the binary (probe only)", f"sha256sum {build.remote_dir}/cronium-runner", None),
        ("cronium-runner version", f"{build.remote_dir}/cronium-runner version", None),
    ]
    for label, command, stdin in cases:
        used = 0.0
        for _ in range(5):
            if label == "install":
                await connection.run(REMOVE_RUNNER)
            before = server_cpu_s(fleet, [name])
            result = await connection.run(command, input=stdin, encoding=None, check=False)
            used += server_cpu_s(fleet, [name]) - before
            assert result.exit_status == 0, (label, result.stderr)
        print(f"  {label:32s} {used * 1000 / 5:5.1f} ms of server CPU", flush=True)
    connection.close()


def fanout_cpu(fleet: Fleet, names: list[str], state: str) -> None:
    """B2's fan-out, each tool on new connections and then on warm ones, 3 times each."""
    servers = [fleet.inventory[name] for name in names]

    def ours_cold() -> None:
        with Executor(fleet.inventory, state_dir=state) as executor:
            assert executor.run(FANOUT, names).ok

    for _ in range(3):
        measure("fan-out, cronium_nb, new connections", fleet, names, ours_cold)
    # The least a run through any runner could cost on a new connection (an exec channel that
    # starts the runner binary, then the script), against the bare exec the peers do.
    version = RunnerBuilds(runner_dist()).choose(HostInfo("x86_64")).invocation(["version"])
    for label, command in (("fan-out, asyncssh exec, new connections", FANOUT.script),
                           ("the same, and the runner started", f"{version} >/dev/null; {FANOUT.script}")):  # fmt: skip
        for _ in range(3):
            measure(label, fleet, names, lambda: asyncio.run(connect_and_close(fleet, names, command)))
    with Executor(fleet.inventory, state_dir=state) as executor:
        assert executor.run(FANOUT, names).ok
        for _ in range(3):
            measure("fan-out, cronium_nb, warm", fleet, names, lambda: executor.run(FANOUT, names))
    for tool in (ParallelSsh(servers), FabricGroup(servers)):
        try:
            for new_client, label in ((True, "new client"), (False, "reused")):
                tool.run(FANOUT.script, "load average", new_client=new_client)
                for _ in range(3):
                    measure(f"fan-out, {tool.name}, {label}", fleet, names,
                            lambda: tool.run(FANOUT.script, "load average", new_client=new_client))  # fmt: skip
        finally:
            tool.close()


def main(count: int = 20) -> None:
    with Fleet.up(amd64=count, arm64=0) as fleet, tempfile.TemporaryDirectory() as state:
        names = fleet.names[:count]

        def run_new_executor() -> None:
            with Executor(fleet.inventory, state_dir=state) as executor:
                assert executor.run(EVENT, names).ok

        run_new_executor()  # deployed once: the host facts are remembered, as in B3
        for _ in range(3):
            for name in names:
                fleet.exec(name, REMOVE_RUNNER)
            measure("cold deployment (B3)", fleet, names, run_new_executor)
        for _ in range(2):
            measure("new connections, runner cached", fleet, names, run_new_executor)
        measure("SSH connection alone", fleet, names, lambda: asyncio.run(connect_and_close(fleet, names)))
        fanout_cpu(fleet, names, state)
        print(f"deploy steps on {names[0]}:")
        asyncio.run(steps(fleet, names[0]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
