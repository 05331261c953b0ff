"""The Dask backend's parts that need no cluster: placement by site, the relayed result format,
the ``site`` field, and that the local path never loads Dask."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from cronium_nb import Executor, Inventory, InventoryError, Server
from cronium_nb.cluster.placement import PlacementError, place
from cronium_nb.cluster.relay import apply_fields, result_fields
from cronium_nb.model import Status
from cronium_nb.results import ServerResult
from tests.conftest import REPO_ROOT
from tests.unit.conftest import RUNNER_DIST


def servers(*sites: str | None) -> list[Server]:
    return [Server(name=f"s{i}", host="127.0.0.1", site=site) for i, site in enumerate(sites)]


def names(plan: dict[str, list[Server]]) -> dict[str, list[str]]:
    return {address: [s.name for s in members] for address, members in plan.items()}


def test_sited_servers_go_to_the_workers_offering_their_site_spread_by_load() -> None:
    workers = {"tcp://a": {"site-eu": 1}, "tcp://b": {"site-eu": 1}, "tcp://c": {"site-us": 1, "GPU": 2}}
    plan = place(servers("eu", "eu", "eu", "us", None, None), workers)
    assert names(plan) == {"tcp://a": ["s0", "s2"], "tcp://b": ["s1", "s4"], "tcp://c": ["s3", "s5"]}


def test_unsited_servers_run_on_any_worker() -> None:
    plan = place(servers(None, None, None), {"tcp://x": {}, "tcp://y": {"site-eu": 1}})
    assert names(plan) == {"tcp://x": ["s0", "s2"], "tcp://y": ["s1"]}


def test_a_site_no_worker_offers_is_refused_naming_the_servers_and_the_offered_sites() -> None:
    with pytest.raises(PlacementError, match=r"no Dask worker offers site 'mars' \(worker resource site-mars\) "
                       r"for server\(s\) s1; the workers offer: site-eu"):  # fmt: skip
        place(servers("eu", "mars"), {"tcp://a": {"site-eu": 1}, "tcp://b": {"site-eu": 0.0}})
    with pytest.raises(PlacementError, match="no workers"):
        place(servers(None), {})
    assert issubclass(PlacementError, ValueError)


def test_site_is_an_inventory_field_checked_like_the_others() -> None:
    inventory = Inventory.from_yaml(
        "defaults: {site: eu-west.1}\nservers:\n  - {name: a, host: h1}\n  - {name: b, host: h2, site: us}\n"
    )
    assert [s.site for s in inventory] == ["eu-west.1", "us"]
    with pytest.raises(InventoryError, match=r"<inventory>:3: server .b.: site must be letters, digits"):
        Inventory.from_yaml("servers:\n  - {name: a, host: h1}\n  - {name: b, host: h2, site: 'us east'}\n")
    for bad in ("", "-x", "a/b", "x" * 65, 3):
        with pytest.raises(ValueError, match="site must be"):
            Server(name="a", host="h", site=bad)  # type: ignore[arg-type]


def test_a_result_travels_back_whole() -> None:
    sent = ServerResult("web1", Status.FAILED, arch="aarch64", exit_code=3, duration_s=1.5, deploy="cached",
                        attempts=1, error="exit code 3", error_kind="script", outputs={"n": [1, 2]},
                        variables={"v": {"deep": True}}, phases={"run": 0.5}, helpers="bundled")  # fmt: skip
    received = ServerResult("web1")
    apply_fields(received, json.loads(json.dumps(result_fields(sent))))  # plain data, as msgpack carries it
    assert received == sent


def test_the_executor_refuses_a_cluster_that_is_not_a_dask_client(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"cluster must be a distributed\.Client, got object"):
        Executor(state_dir=tmp_path, cluster=object())


def test_a_local_run_does_not_import_dask(local_servers, tmp_path) -> None:
    """In a fresh interpreter (other tests of this process may have loaded Dask): a real local
    run, then no dask or distributed module loaded, and the summary's worker column empty."""
    fleet = local_servers(1)
    inventory = [dataclasses.asdict(s) for s in fleet.inventory]
    program = textwrap.dedent(f"""
        import json, sys
        import cronium_nb as cn
        inventory = cn.Inventory([cn.Server(**fields) for fields in json.loads({json.dumps(json.dumps(inventory))})])
        options = cn.SSHOptions(ssh_config=None)
        with cn.Executor(inventory, state_dir={str(tmp_path / "state")!r}, runner_dist={str(RUNNER_DIST)!r},
                         ssh_options=options) as executor:
            result = executor.run(cn.Event(name="local", script="echo local"), servers="all")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
        print(json.dumps({{"status": result.status.value, "workers": result.summary["worker"].tolist(),
                          "lines": result.logs["line"].tolist(), "loaded": loaded}}))
    """)
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report == {"status": "success", "workers": [None], "lines": ["local"], "loaded": []}


def test_a_worker_stops_relaying_past_the_unacknowledged_bound_until_the_client_catches_up() -> None:
    """The agent's side of the flow control, with a recorder for Worker.log_event."""
    from cronium_nb.cluster.agent import Relay
    from cronium_nb.cluster.relay import LINES, RELAY_UNACKED_BYTES

    events: list[dict] = []

    class Recorder:
        def log_event(self, topic: str, message: dict) -> None:
            events.append(message)

    async def scenario() -> None:
        relay = Relay(Recorder(), "topic", "ex1")
        chunk = "x" * 2**20
        count = RELAY_UNACKED_BYTES // len(chunk) + 1
        await relay.room()  # within the bound: no wait
        for _ in range(count):
            relay.send([LINES, "s1", "stdout", chunk, 1, 0.0], len(chunk))
        waiting = asyncio.ensure_future(relay.room())
        await asyncio.sleep(0)  # one turn of the loop: it is now waiting for an acknowledgement
        assert not waiting.done()
        assert sum(len(m["items"]) for m in events) == count  # all of it sent before waiting
        relay.acknowledge(len(chunk) // 2)  # still past the bound
        await asyncio.sleep(0)
        assert not waiting.done()
        relay.acknowledge(len(chunk))  # exactly the bound left unacknowledged: room again
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())
