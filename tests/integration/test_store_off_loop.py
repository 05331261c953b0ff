"""The store never blocks the executor's loop: while another process holds the database's write
lock, a running script's lines still arrive live, the loop is never held up for a good part of
the time the lock was held (as it would be, for all of it, if it waited on the lock itself), and
once the lock is gone every line is stored."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cronium_nb import Callbacks, Event, Executor, Fleet
from cronium_nb.store import DB_NAME
from tests.runner_harness import wait_for

pytestmark = pytest.mark.fleet
# The loop's longest late wake-up may not come near how long the lock was held: a loop waiting
# on the lock would be late by all of it. The bound is far above what a busy machine's scheduling
# alone costs a short sleep (tens of milliseconds seen with the whole suite running on 2 cores).
MAX_STALL_S = 0.5
MIN_LOCK_HELD_S = 3 * MAX_STALL_S
TICK_S = 0.005

HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, as another notebook writing would hold it
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
db.execute("COMMIT")
"""


async def longest_stall(stop: threading.Event) -> float:
    """How late the loop ever woke from a short sleep, until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(TICK_S)
        worst = max(worst, loop.time() - before - TICK_S)
    return worst


def test_a_locked_database_does_not_stall_the_loop(cronium_fleet: Fleet, tmp_path: Path) -> None:
    name = cronium_fleet.names[0]
    marker = f"/tmp/stall-test-{tmp_path.name}"
    script = f'for i in $(seq 1 6000); do echo "line $i"; [ -e {marker} ] && break; sleep 0.01; done; echo finished'
    lines: list[str] = []
    state = tmp_path / "state"
    with Executor(cronium_fleet.inventory, state_dir=state) as executor:
        job = executor.submit(
            Event(name="store-off-loop", script=script),
            servers=[name],
            callbacks=Callbacks(on_line=lambda server, stream, text, ts: lines.append(text)),
        )
        assert wait_for(lambda: len(lines) > 0, timeout=60), "the script never printed"
        stop = threading.Event()
        # The test reaches into the executor's own loop: that loop is what must not stall.
        watcher = asyncio.run_coroutine_threadsafe(longest_stall(stop), executor._loop_thread.loop)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITE_LOCK, str(state / DB_NAME)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            locked_at, at_lock = time.monotonic(), len(lines)
            # ~3 s of output while locked: several log flushes are queued behind the lock
            assert wait_for(lambda: len(lines) >= at_lock + 250, timeout=60), "lines stopped while locked"
            assert holder.poll() is None, "the lock holder gave up early"
            held_for = time.monotonic() - locked_at
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=60)
        cronium_fleet.exec(name, f"touch {marker}")
        try:
            result = job.result(timeout=120)
        finally:
            stop.set()
        stall = watcher.result(timeout=10)
        cronium_fleet.exec(name, f"rm -f {marker}")
        assert result.ok, result.summary.to_string()
        assert held_for >= MIN_LOCK_HELD_S, f"the lock was held only {held_for:.2f} s: too short to tell"
        assert stall < MAX_STALL_S, (
            f"the loop stalled for {stall * 1000:.1f} ms while the lock was held {held_for:.2f} s"
        )
        stored = list(result.logs["line"])
        assert stored == lines and stored[-1] == "finished"
