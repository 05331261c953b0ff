"""The runtime service's own defences, on this machine (no server needed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cronium_nb.runtime_api import RuntimeService


def test_the_service_drops_idle_connections_and_caps_them(tmp_path: Path) -> None:
    """A local flood of idle connections cannot exhaust the orchestrator: each is dropped once it
    has not sent a request head within the deadline, and those past the cap at once."""

    async def scenario() -> tuple[int, int, int, float]:
        service = RuntimeService(max_connections=50, head_timeout=1.0)
        path = await service.start()
        writers = []
        for _ in range(80):
            _reader, writer = await asyncio.open_unix_connection(str(path))
            writers.append((_reader, writer))
        started = time.monotonic()
        closed = 0
        for reader, _writer in writers:  # each read ends with EOF when the service drops it
            if await asyncio.wait_for(reader.read(), timeout=30) == b"":
                closed += 1
        elapsed = time.monotonic() - started
        counts = service.refused_connections, service.expired_connections
        for _reader, writer in writers:
            writer.close()
        await service.close()
        return closed, *counts, elapsed

    closed, refused, expired, elapsed = asyncio.run(scenario())
    assert closed == 80
    assert (refused, expired) == (30, 50)
    assert elapsed < 20  # dropped at the head deadline, not kept for ever (a hang is the bug)
