"""The Dask backend on the real fleet: a LocalCluster of two worker processes (one per site,
``site-east`` and ``site-west``), 8 servers (3 amd64 + 1 arm64 per site), Executor(cluster=client).

Each site's servers run on that site's worker (the ``worker`` column), live lines arrive in order
while the scripts run, outputs, variables and the store are as for a local run, cancel and
timeout leave no process on any server, and a worker killed with SIGKILL mid-run fails its
servers with ``worker_lost`` (never rerun elsewhere) while the other worker's finish normally.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

distributed = pytest.importorskip("distributed")

from cronium_nb import Callbacks, Event, Executor, Fleet, Inventory, Status  # noqa: E402
from cronium_nb.cluster.local import local_cluster  # noqa: E402
from cronium_nb.cluster.placement import PlacementError  # noqa: E402
from cronium_nb.store import Store  # noqa: E402
from tests.integration.conftest import FAST_BACKOFF  # noqa: E402
from tests.runner_harness import leftover_processes, processes_matching, wait_for  # noqa: E402

pytestmark = pytest.mark.fleet
SITES = ("east", "west")
tokens = itertools.count(int(time.time()))


@pytest.fixture(scope="module")
def fleet(cronium_fleet_factory) -> Fleet:
    return cronium_fleet_factory(amd64=6, arm64=2, name_prefix="dask-")


@pytest.fixture(scope="module")
def inventory(fleet: Fleet) -> Inventory:
    """Half of each architecture in each site."""
    by_arch: dict[str, list[str]] = defaultdict(list)
    for name in fleet.names:
        by_arch[fleet.member(name).arch].append(name)
    site_of = {name: SITES[index * 2 // len(names)] for names in by_arch.values() for index, name in enumerate(names)}
    return Inventory([dataclasses.replace(s, site=site_of[s.name]) for s in fleet.inventory])


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with local_cluster(SITES) as cluster, distributed.Client(cluster) as dask_client:
        dask_client.wait_for_workers(len(SITES), timeout=120)
        yield dask_client


def site_workers(client: distributed.Client) -> dict[str, str]:
    """site -> the address of the worker offering it, now."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {site: a for a, w in workers.items() for site in SITES if w["resources"].get(f"site-{site}")}


@pytest.fixture(scope="module")
def executor(client: distributed.Client, inventory: Inventory, tmp_path_factory) -> Iterator[Executor]:
    """One executor for the module: its agents stay warm from one test to the next."""
    with Executor(
        inventory, cluster=client, state_dir=tmp_path_factory.mktemp("dask-state"), deploy_backoff=FAST_BACKOFF
    ) as through_cluster:
        yield through_cluster


class Lines:
    """on_line, recorded: each server's lines in arrival order."""

    def __init__(self, wanted: str, servers: int) -> None:
        self.by_server: dict[str, list[str]] = defaultdict(list)
        self.wanted, self.servers = wanted, servers
        self.everyone = threading.Event()

    def on_line(self, server: str, stream: str, text: str, ts: float) -> None:
        self.by_server[server].append(text)
        if sum(self.wanted in lines for lines in self.by_server.values()) == self.servers:
            self.everyone.set()


def leftovers(fleet: Fleet, names, pattern: str) -> dict[str, list[str]]:
    """The job's processes still on each of ``names`` (see leftover_processes); empty: none."""
    return {name: found for name in names if (found := leftover_processes(fleet, name, pattern))}


def tasks_named(prefix: str, dask_scheduler) -> list[str]:
    """Run on the scheduler: its tasks whose key starts with ``prefix``."""
    return [str(key) for key in dask_scheduler.tasks if str(key).startswith(prefix)]


def wait_until_all_print(executor: Executor, event: Event, wanted: str, **options) -> tuple:
    lines = Lines(wanted, len(executor.inventory))
    job = executor.submit(event, callbacks=Callbacks(on_line=lines.on_line), **options)
    assert lines.everyone.wait(120), f"not every server printed {wanted!r}: {dict(lines.by_server)}"
    return job, lines


SCRIPT = """\
echo "line 1"
go=/tmp/dask-go-$(cronium.input token)
for i in $(seq 1200); do [ -e "$go" ] && break; sleep 0.1; done
echo "line 2"
echo "seed=$(cronium.getVariable seed)"
cronium.setVariable last "$(cronium.event server)"
cronium.output "{\\"server\\": \\"$(cronium.event server)\\", \\"machine\\": \\"$(uname -m)\\"}"
"""


def test_sites_live_lines_outputs_and_variables_as_for_a_local_run(
    executor: Executor, client, fleet: Fleet, inventory: Inventory, executor_factory
) -> None:
    event = Event(name="dask-live", script=SCRIPT, timeout=180)
    executor.store.set_variable("global", "seed", 5)
    token = next(tokens)
    # The scripts wait for a file this test creates only once every "line 1" has arrived here:
    # the lines came while the scripts ran.
    job, lines = wait_until_all_print(executor, event, "line 1", input={"token": token})
    for name in fleet.names:
        fleet.exec(name, f"touch /tmp/dask-go-{token}")
    result = job.result(timeout=180)
    assert result.status == Status.SUCCESS, result.summary.to_string()

    workers = site_workers(client)
    rows = result.summary.set_index("server")
    for server in inventory:
        assert rows.loc[server.name, "worker"] == workers[server.site], rows.to_string()
    expected = ["line 1", "line 2", "seed=5"]
    assert dict(lines.by_server) == {name: expected for name in fleet.names}  # each server's, in order

    local = executor_factory(inventory)
    local.store.set_variable("global", "seed", 5)
    at_home = local.run(event, servers="all", input={"token": token})  # the file is there: no wait
    assert at_home.outputs == result.outputs and at_home.variables == result.variables
    assert result.outputs == {
        s.name: {"server": s.name, "machine": "x86_64" if "amd64" in s.name else "aarch64"} for s in inventory
    }
    assert all(variables["last"] == name for name, variables in result.variables.items())
    columns = ["server", "arch", "status", "exit_code", "error", "error_kind"]
    assert at_home.summary[columns].equals(result.summary[columns])
    assert at_home.summary["worker"].isna().all()
    assert at_home.logs[["server", "seq", "stream", "line"]].equals(result.logs[["server", "seq", "stream", "line"]])

    with Store.open_readonly(executor.state_dir) as store:  # the notebook's store has it all
        stored = store.server_results(result.execution_id).set_index("server")
        assert store.execution_status(result.execution_id) == Status.SUCCESS
        assert store.get_variables("global")["last"] in fleet.names
    assert stored["worker"].to_dict() == rows["worker"].to_dict()
    assert stored["outputs"].to_dict() == result.outputs

    again = executor.run(Event(name="dask-warm", script="echo warm"), servers="all")  # the agents kept their pools
    assert again.ok and set(again.summary["deploy"]) == {"cached"}, again.summary.to_string()


def test_bad_input_is_refused_before_anything_runs(executor: Executor, inventory: Inventory) -> None:
    first = next(iter(inventory))
    elsewhere = [dataclasses.replace(first, site="mars")]
    before = len(executor.history(1000))
    with pytest.raises(PlacementError, match="no Dask worker offers site 'mars'"):
        executor.submit(Event(name="nowhere", script="echo no"), servers=elsewhere)
    with pytest.raises(ValueError, match="api=True is not available through a Dask cluster"):
        executor.submit(Event(name="api", script="echo no"), api=True)
    assert len(executor.history(1000)) == before


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_and_timeout_leave_no_process_on_any_server(executor: Executor, fleet: Fleet, how: str) -> None:
    marker = "sleep 5021" if how == "cancel" else "sleep 5022"
    event = Event(name=f"dask-{how}", script=f"echo running; {marker}", timeout=600 if how == "cancel" else 20)
    job, _lines = wait_until_all_print(executor, event, "running")
    if how == "cancel":
        job.cancel()
    result = job.result(timeout=180)
    status = Status.CANCELLED if how == "cancel" else Status.TIMEOUT
    assert result.status == status, result.summary.to_string()
    assert set(result.summary["status"]) == {status.value} and set(result.summary["error_kind"]) == {status.value}
    # (the agents keep their idle runner sessions for the next run, as a local executor does)
    still = {name: found for name in fleet.names if (found := processes_matching(fleet, name, marker))}
    assert still == {}


def test_an_output_past_the_flow_control_bound_arrives_whole(executor: Executor, inventory: Inventory) -> None:
    """30 MB of lines from one server: more than a worker may relay unacknowledged
    (RELAY_UNACKED_BYTES), so it waits for the client's acknowledgements; every line arrives,
    live and in the store, in order."""
    lines = 300_000
    target = [next(s.name for s in inventory if s.site == "west" and "amd64" in s.name)]
    seen: list[str] = []
    script = f"seq -f '%099g' 1 {lines}"  # 100 bytes a line with its newline
    result = executor.run(
        Event(name="dask-big", script=script, timeout=300),
        target,
        callbacks=Callbacks(on_line=lambda server, stream, text, ts: seen.append(text)),
    )
    assert result.ok, result.summary.to_string()
    assert len(seen) == lines and seen[0] == f"{1:099d}" and seen[-1] == f"{lines:099d}"
    stored = result.logs
    assert len(stored) == lines and stored["seq"].tolist() == list(range(1, lines + 1))
    assert stored["line"].iloc[-1] == f"{lines:099d}"


def early_cancels(agent_name: str, dask_worker) -> list[str]:
    """Run on a worker: the executions whose cancel came before their task (see CroniumAgent)."""
    return list(dask_worker.plugins[agent_name]._early_cancels)


def test_a_cancel_that_comes_before_the_worker_starts_the_task(
    fleet: Fleet, inventory: Inventory, tmp_path_factory
) -> None:
    """Workers with one thread: a second execution waits behind the first; cancelled meanwhile,
    its script never runs once the thread is free."""
    token = next(tokens)
    target = [next(s.name for s in inventory if s.site == "east")]
    with (
        local_cluster(SITES, threads_per_worker=1) as cluster,
        distributed.Client(cluster) as one_thread,
        Executor(inventory, cluster=one_thread, state_dir=tmp_path_factory.mktemp("dask-queued")) as executor,
    ):
        one_thread.wait_for_workers(len(SITES), timeout=120)
        blocking = Event(name="dask-blocker", script=SCRIPT, timeout=180)
        lines = Lines("line 1", 1)
        blocker = executor.submit(blocking, target, input={"token": token}, callbacks=Callbacks(on_line=lines.on_line))
        assert lines.everyone.wait(120), dict(lines.by_server)
        queued = executor.submit(Event(name="dask-queued", script=f"touch /tmp/dask-queued-{token}"), target)
        prefix = f"cronium-{queued.execution_id}-"
        assert wait_for(lambda: one_thread.run_on_scheduler(tasks_named, prefix), timeout=60)  # its task is queued
        queued.cancel()
        east = site_workers(one_thread)["east"]
        agent = executor._cluster.agent_name

        def cancel_arrived() -> bool:
            return queued.execution_id in one_thread.run(early_cancels, agent, workers=[east])[east]

        assert wait_for(cancel_arrived, timeout=60)
        fleet.exec(target[0], f"touch /tmp/dask-go-{token}")  # the blocker ends, the thread is free
        assert blocker.result(timeout=120).ok
        result = queued.result(timeout=120)
    assert result.status == Status.CANCELLED and result[target[0]].error_kind == "cancelled", result.summary
    assert result[target[0]].worker == east
    assert fleet.exec(target[0], f"ls /tmp/dask-queued-{token}").exit_code != 0  # the script never ran


def test_the_first_failure_stops_the_other_workers_servers_too(
    executor: Executor, fleet: Fleet, inventory: Inventory
) -> None:
    """continue_on_failure=False: one east server fails, and the west worker's servers are
    cancelled by the client (a cancel across workers), leaving no process."""
    failing = next(s.name for s in inventory if s.site == "east")
    script = f'[ "$(cronium.event server)" = {failing} ] && exit 3; echo running; sleep 5023'
    result = executor.run(Event(name="dask-first-failure", script=script), servers="all", continue_on_failure=False)
    rows = result.summary.set_index("server")
    assert (rows.loc[failing, "status"], rows.loc[failing, "error_kind"]) == ("failed", "script"), rows.to_string()
    others = rows.drop(index=failing)
    assert set(others["status"]) == {"cancelled"}, rows.to_string()
    assert {s.site for s in inventory if s.name in others.index} == set(SITES)
    assert result.status == Status.FAILED
    still = {name: found for name in fleet.names if (found := processes_matching(fleet, name, "sleep 5023"))}
    assert still == {}


def test_a_worker_killed_mid_run_fails_only_its_servers_and_nothing_reruns(
    executor: Executor, client, fleet: Fleet, inventory: Inventory
) -> None:
    """Last in the module: the cluster's nanny then replaces the killed worker."""
    token = next(tokens)
    runs = f"/tmp/dask-runs-{token}"
    script = f'echo ran >> {runs}; echo running; for i in $(seq 20); do sleep 0.5; done; echo "finished"'
    event = Event(name="dask-kill", script=script, timeout=120)
    east = site_workers(client)["east"]
    job, lines = wait_until_all_print(executor, event, "running")
    (pid,) = client.run(os.getpid, workers=[east]).values()
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    result = job.result(timeout=180)
    noticed = time.monotonic() - killed_at

    rows = result.summary.set_index("server")
    east_servers = {s.name for s in inventory if s.site == "east"}
    for name in fleet.names:
        row = rows.loc[name]
        if name in east_servers:
            assert (row["status"], row["error_kind"]) == ("failed", "worker_lost"), rows.to_string()
            assert f"the Dask worker {east} was lost" in row["error"] and "not rerun" in row["error"]
        else:
            assert row["status"] == "success" and lines.by_server[name][-1] == "finished", rows.to_string()
    assert result.status == Status.PARTIAL
    assert noticed < 60, noticed  # a bounded detection (the script alone would take 10 s): a hang is the bug
    with Store.open_readonly(executor.state_dir) as store:
        stored = store.server_results(result.execution_id).set_index("server")
    assert set(stored.loc[sorted(east_servers), "error_kind"]) == {"worker_lost"}

    # The replacement worker comes up with the same site; the lost task is gone from the
    # scheduler, so it can never run there, and each script ran exactly once.
    client.wait_for_workers(len(SITES), timeout=120)
    prefix = f"cronium-{result.execution_id}-"
    assert wait_for(lambda: client.run_on_scheduler(tasks_named, prefix) == [], timeout=30)
    for name in fleet.names:
        assert fleet.exec(name, f"cat {runs}").output.split() == ["ran"], name
    # The killed worker's SSH connections closed with it: its scripts are stopped too.
    script_parts = r"seq 20|sleep 0\.5"
    assert wait_for(lambda: not leftovers(fleet, east_servers, script_parts), timeout=60), leftovers(
        fleet, east_servers, script_parts
    )
    assert executor.run(Event(name="dask-after", script="echo back"), servers="all").ok  # the new worker serves east
