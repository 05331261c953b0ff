"""A Job is a concurrent.futures.Future of the execution's result: usable with the standard
library's waiting tools and asyncio, and startable from inside the executor's own callbacks."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from cronium_nb import Callbacks, Event, Job, Status
from tests.runner_harness import submit_and_wait_for_output


@pytest.mark.timeout(60)  # a hang is the bug
def test_submit_from_a_callback_does_not_deadlock(local_servers, local_executor) -> None:
    """A status callback (on the executor's loop) starts a follow-up execution."""
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    follow_ups: list[Job] = []

    def on_status(result) -> None:
        if result.status == Status.SUCCESS and not follow_ups:
            follow_ups.append(executor.submit(Event(name="follow-up", script="echo second")))

    first = executor.run(Event(name="first", script="echo first"), callbacks=Callbacks(on_status=on_status))
    assert first.ok
    assert len(follow_ups) == 1
    second = follow_ups[0].result(timeout=60)
    assert second.ok and second.logs["line"].tolist() == ["second"]


@pytest.mark.timeout(60)  # a hang is the bug
def test_run_from_a_callback_is_refused(local_servers, local_executor) -> None:
    """Waiting for the loop from the loop would hang: run() says so instead."""
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    errors: list[BaseException] = []

    def on_status(result) -> None:
        if result.status == Status.SUCCESS and not errors:
            try:
                executor.run(Event(name="nested", script="true"))
            except RuntimeError as error:
                errors.append(error)

    assert executor.run(Event(name="outer", script="true"), callbacks=Callbacks(on_status=on_status)).ok
    assert len(errors) == 1 and "submit()" in str(errors[0])


def test_a_job_is_a_future(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    jobs = [executor.submit(Event(name=f"future-{i}", script=f"echo {i}")) for i in range(3)]
    assert all(isinstance(job, concurrent.futures.Future) for job in jobs)
    done, pending = concurrent.futures.wait(jobs, timeout=60)
    assert not pending and all(job.result().ok for job in done)

    async def awaited() -> list[str]:
        job = executor.submit(Event(name="awaited", script="echo via asyncio"))
        result = await asyncio.wrap_future(job)
        return result.logs["line"].tolist()

    assert asyncio.run(awaited()) == ["via asyncio", "via asyncio"]


@pytest.mark.timeout(60)
def test_cancel_gives_the_cancelled_result(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    job = submit_and_wait_for_output(executor, Event(name="to-cancel", script="echo running; sleep 600"))
    assert job.cancel() is True
    result = job.result(timeout=30)
    assert result.status == Status.CANCELLED and not job.cancelled()  # completed, with the result
    assert job.cancel() is False  # over


def recorded_status(executor, execution_id: str) -> str:
    history = executor.history()
    return history.set_index("execution_id").loc[execution_id, "status"]


@pytest.mark.timeout(60)
def test_a_cancel_at_once_is_recorded(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    job = executor.submit(Event(name="cancel-at-once", script="sleep 600"))
    job.cancel()
    result = job.result(timeout=30)
    assert result.status == Status.CANCELLED
    assert recorded_status(executor, job.execution_id) == "cancelled"


@pytest.mark.timeout(60)
def test_cancelling_twice_still_records_the_cancelled_result(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    job = submit_and_wait_for_output(executor, Event(name="cancel-twice", script="echo running; sleep 600"))
    job.cancel()
    job.cancel()
    result = job.result(timeout=30)
    assert result.status == Status.CANCELLED
    assert recorded_status(executor, job.execution_id) == "cancelled"
    assert set(result.summary["status"]) == {"cancelled"}


@pytest.mark.timeout(60)
def test_a_cancelled_run_async_is_recorded(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)

    async def main() -> None:
        task = asyncio.ensure_future(executor.run_async(Event(name="async-cancel", script="echo up; sleep 600")))
        while executor.history().empty:  # bounded by the test's timeout
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert executor.history().iloc[0]["status"] == "cancelled"


@pytest.mark.timeout(120)
def test_close_cancels_what_runs_and_records_it(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    job = submit_and_wait_for_output(executor, Event(name="closed-under-it", script="echo running; sleep 600"))
    executor.close()
    result = job.result(timeout=5)  # close() waited for it
    assert result.status == Status.CANCELLED and result[fleet.names[0]].error_kind == "cancelled"


def test_a_raising_callback_does_not_stop_the_run(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)

    def broken(*args) -> None:
        raise RuntimeError("a bug in a widget")

    callbacks = Callbacks(on_line=broken, on_status=broken)
    result = executor.run(Event(name="broken-callbacks", script="echo fine"), callbacks=callbacks)
    assert result.ok and result.logs["line"].tolist() == ["fine", "fine"]
    assert recorded_status(executor, result.execution_id) == "success"
