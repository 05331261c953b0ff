"""Rollouts without Docker: the batching policy, and batch_size/max_fail, skipped servers,
retry_failed() and the dry-run plan through the executor against in-process SSH servers."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from cronium_nb import Event, Status
from cronium_nb.rollout import Rollout, RolloutError
from cronium_nb.store import DB_NAME

pytestmark = pytest.mark.timeout(120)  # a hang is the bug


def test_batches_keep_the_order_and_the_last_one_may_be_short() -> None:
    assert Rollout(batch_size=2).batches(list("abcde")) == [["a", "b"], ["c", "d"], ["e"]]
    assert Rollout().batches(list("abc")) == [["a", "b", "c"]]  # no batch size: all at once
    assert Rollout(batch_size=10).batches(list("ab")) == [["a", "b"]]
    assert Rollout(batch_size=2).batches([]) == []


@pytest.mark.parametrize(
    ("max_fail", "failed", "total", "stop"),
    [
        (1, 1, 6, False),  # at the limit: go on
        (1, 2, 6, True),  # more than the limit: stop
        (0, 1, 6, True),
        (0.25, 1, 6, False),  # 1 of 6 is under a quarter (1.5)
        (0.25, 2, 6, True),
        (None, 6, 6, False),  # no limit
    ],
)
def test_stopping_past_max_fail(max_fail: float | None, failed: int, total: int, stop: bool) -> None:
    assert Rollout(batch_size=2, max_fail=max_fail).should_stop(failed, total) is stop


@pytest.mark.parametrize(
    ("batch_size", "max_fail", "message"),
    [
        (0, None, "batch_size must be a whole number of servers, 1 or more, got 0"),
        (2.5, None, "batch_size must be a whole number"),
        (True, None, "batch_size must be a whole number"),
        (2, -1, "max_fail must be 0 or more servers, got -1"),
        (2, 1.0, "max_fail as a fraction must be between 0 and 1 (exclusive), got 1.0"),
        (2, 1.5, "max_fail as a fraction must be between 0 and 1"),
        (2, "1", "max_fail must be a count (int) or a fraction"),
        (None, 1, "max_fail needs a batch_size: without batches every server starts at once"),
    ],
)
def test_bad_rollout_settings_are_refused(batch_size: object, max_fail: object, message: str) -> None:
    with pytest.raises(RolloutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Rollout(batch_size, max_fail)  # type: ignore[arg-type]


FAILS_ON = 'case "$(cronium.event server)" in {names}) echo "failing on purpose"; exit 3;; esac\n'
RECORD = 'echo ran > "$HOME/ran-$(cronium.event execution_id)"\ncronium.output ok true\n'


def rollout_event(failing: str) -> Event:
    """Writes a file in the home of every server it runs on (the proof it ran there), and
    fails on the servers named in ``failing`` (a shell case pattern, ``a|b``)."""
    return Event(name="rollout", script=RECORD + FAILS_ON.format(names=failing), timeout=30)


def ran_on(fleet, execution_id: str) -> list[str]:
    return [name for name in fleet.names if (fleet[name].home / f"ran-{execution_id}").exists()]


def test_a_rollout_stops_past_max_fail_and_retry_reruns_the_rest(local_servers, local_executor) -> None:
    fleet = local_servers(6)
    executor = local_executor(fleet.inventory)
    event = rollout_event("srv-3|srv-4")

    res = executor.run(event, servers="all", batch_size=2, max_fail=1)

    statuses = dict(zip(res.summary["server"], res.summary["status"], strict=True))
    assert statuses == {
        "srv-1": "success", "srv-2": "success", "srv-3": "failed", "srv-4": "failed",
        "srv-5": "skipped", "srv-6": "skipped",
    }  # fmt: skip
    assert res.status == Status.PARTIAL
    assert res.counts == {"success": 2, "failed": 2, "skipped": 2}
    assert ran_on(fleet, res.execution_id) == ["srv-1", "srv-2", "srv-3", "srv-4"]  # 5 and 6 ran nothing
    assert res["srv-5"].error == (
        "skipped: the rollout stopped after batch 2 of 3: 2 server(s) did not succeed, more than max_fail=1"
    )
    stored = executor.store.server_results(res.execution_id).set_index("server")["status"]
    assert stored.to_dict() == statuses
    row = executor.history().iloc[0]
    assert (row["servers_ok"], row["servers_failed"], row["servers_skipped"]) == (2, 2, 2)

    retry = res.retry_failed()

    assert list(retry.servers) == ["srv-3", "srv-4", "srv-5", "srv-6"]
    # the same rollout settings: 3 and 4 fail again (its batch 1), past max_fail=1, so 5 and 6 are skipped
    assert ran_on(fleet, retry.execution_id) == ["srv-3", "srv-4"]
    assert retry.retry_of == res.execution_id
    history = executor.history().set_index("execution_id")
    assert history.loc[retry.execution_id, "retry_of"] == res.execution_id
    assert history.loc[retry.execution_id, "event"] == "rollout"
    assert retry.counts == {"failed": 2, "skipped": 2}
    with sqlite3.connect(executor.state_dir / DB_NAME) as db:
        options = db.execute("SELECT options FROM executions WHERE id = ?", (retry.execution_id,)).fetchone()[0]
    assert '"batch_size": 2' in options and '"max_fail": 1' in options


def test_retry_after_a_fix_succeeds_and_nothing_to_retry_is_an_error(local_servers, local_executor) -> None:
    fleet = local_servers(3)
    executor = local_executor(fleet.inventory)
    marker = fleet["srv-2"].home / "broken"
    marker.write_text("x")
    event = Event(name="fixable", script='test ! -e "$HOME/broken"', timeout=30)
    first = executor.run(event, servers="all", batch_size=1, max_fail=0.5)
    assert first.counts == {"success": 2, "failed": 1}  # 1 of 3 is not more than half
    marker.unlink()
    second = first.retry_failed()
    assert list(second.servers) == ["srv-2"] and second.status == Status.SUCCESS
    with pytest.raises(ValueError, match=f"nothing to retry: every server of execution {second.execution_id}"):
        second.retry_failed()


def test_run_async_rolls_out_too_and_continue_on_failure_off_cancels_the_later_batches(
    local_servers, local_executor
) -> None:
    fleet = local_servers(4)
    executor = local_executor(fleet.inventory)
    event = rollout_event("srv-1")
    res = asyncio.run(executor.run_async(event, servers="all", batch_size=1, max_fail=0))
    assert res.counts == {"failed": 1, "skipped": 3} and ran_on(fleet, res.execution_id) == ["srv-1"]

    res = executor.run(event, servers="all", batch_size=2, continue_on_failure=False)
    assert ran_on(fleet, res.execution_id) in (["srv-1"], ["srv-1", "srv-2"])  # srv-2: cancelled, maybe mid-way
    assert res["srv-1"].status == Status.FAILED
    for name in ("srv-3", "srv-4"):
        assert (res[name].status, res[name].error) == (Status.CANCELLED, "cancelled before it began")


def test_bad_rollout_settings_raise_before_anything_runs(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    with pytest.raises(RolloutError, match="batch_size must be"):
        executor.submit(Event(name="x", script="true"), servers="all", batch_size=0)
    assert executor.history().empty


def test_the_plan_says_what_would_run_and_what_this_machine_knows(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    event = Event(name="planned", script="echo hi", timeout=30, env={"MODE": "check"}, secrets={"TOKEN": "pl4n-s3cret"})

    before = executor.plan(event, servers="all", batch_size=1)

    assert before.servers == ["srv-1", "srv-2"]
    assert list(before.targets["batch"]) == [1, 2]
    assert list(before.targets["host"]) == ["127.0.0.1", "127.0.0.1"]
    assert list(before.targets["port"]) == [fleet[name].port for name in fleet.names]
    assert list(before.targets["runner_cached"]) == [None, None]  # never probed from here: unknown
    assert before.manifest["env"] == {"MODE": "check"} and before.manifest["name"] == "planned"
    assert before.options == {"batch_size": 1, "max_fail": None}
    assert executor.history().empty  # nothing ran, nothing recorded
    assert "nothing sent" in repr(before) and before.checksum in repr(before)
    assert "pl4n-s3cret" not in repr(before) + before.html() + str(before.manifest)  # secrets stay out

    executor.run(event, servers=["srv-1"])
    after = executor.plan(event, servers="all")

    assert list(after.targets["runner_cached"]) == [True, None]
    assert after.targets["runner"][0].startswith(executor._parts.deployer.builds.version)
    assert after.targets["arch"][0] == os.uname().machine
    assert after.checksum == before.checksum  # the same payload as the run shipped
    stored = executor.store.payloads()
    assert [row.hash for row in stored] == [after.checksum]
