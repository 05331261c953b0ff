"""The runtime service's own defences, on this machine (no server needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

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


def test_a_body_sent_byte_by_byte_does_not_hold_the_connection(monkeypatch) -> None:
    """Past the head deadline, an authenticated request whose body never completes is answered
    408 once BODY_TIMEOUT_S is over, and the connection is closed."""
    from cronium_nb import runtime_api
    from cronium_nb.runtime_api import ApiRun

    monkeypatch.setattr(runtime_api, "BODY_TIMEOUT_S", 1.0)

    async def scenario() -> tuple[bytes, float]:
        service = RuntimeService(head_timeout=0.5)
        path = await service.start()
        token = service.register(ApiRun("exec-1", "srv", "event", None, {}), timeout=60)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(
            b"PUT /v1/executions/exec-1/variables/v HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n".encode()
            + b"[1"
        )
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
        await service.close()
        return answer, time.monotonic() - started

    answer, elapsed = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 408")
    assert elapsed < 20  # a hang is the bug


def test_a_killed_process_leaves_its_directory_only_until_the_next_service_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel killed with its executor open cannot remove the service's private directory;
    the next service this user starts removes it, and leaves alone a live process's, a link, another
    machine's, a half-written owner's and one whose socket still answers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    starter = (
        "import asyncio\n"
        "from cronium_nb.runtime_api import RuntimeService\n"
        "async def main():\n"
        "    print(await RuntimeService().start(), flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )

    host = socket.gethostname()

    def planted(name: str, owner: str) -> Path:
        directory = tmp_path / name
        directory.mkdir(mode=0o700)
        (directory / "owner").write_text(owner)
        return directory

    # removed too: this process's pid with another start time (the pid of an ended one, reused)
    reused = planted("cronium-api-reused", f"{host}:{os.getpid()}:1")
    # never removed: a link by that name (whoever made it), another machine's directory, a half
    # written owner, and an ended owner's whose socket still answers (another pid namespace's)
    victim = planted("victim", f"{host}:999999999:0")
    (tmp_path / "cronium-api-link").symlink_to(victim)
    elsewhere = planted("cronium-api-elsewhere", "another-machine:1:0")
    half_written = planted("cronium-api-half", f"{host}:")
    listening = planted("cronium-api-listening", f"{host}:999999999:0")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(listening / "runtime.sock"))
    listener.listen()
    removed_trees: list[Path] = []
    real_rmtree = shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):  # rmtree refuses a link itself: the sweep must not ask
        removed_trees.append(Path(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)

    async def scenario() -> tuple[Path, bool, bool, bool]:
        live = RuntimeService()
        live_directory = (await live.start()).parent
        other = subprocess.Popen(
            [sys.executable, "-c", starter],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        assert other.stdout is not None
        killed_directory = Path(other.stdout.readline().strip()).parent
        other.kill()
        other.wait()
        left_behind = killed_directory.is_dir()
        newest = RuntimeService()
        await newest.start()
        outcome = left_behind, killed_directory.exists(), live_directory.is_dir()
        await newest.close()
        await live.close()
        return killed_directory, *outcome

    try:
        killed_directory, left_behind, still_there, live_kept = asyncio.run(scenario())
    finally:
        listener.close()
    assert killed_directory.parent == tmp_path
    assert left_behind and not still_there and live_kept
    assert not reused.exists()
    assert (victim / "owner").is_file() and (tmp_path / "cronium-api-link").is_symlink()
    assert elsewhere.is_dir() and half_written.is_dir() and listening.is_dir()
    assert tmp_path / "cronium-api-link" not in removed_trees


def test_concurrent_starts_open_one_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers of one fan-out ask for the service at once: every one of them gets the same
    socket, and one private directory is made (a second would be left behind by close())."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def scenario() -> tuple[set[Path], list[Path], list[Path]]:
        service = RuntimeService()
        paths = await asyncio.gather(*(service.start() for _ in range(8)))
        made = sorted(tmp_path.glob("cronium-api-*"))
        await service.close()
        return set(paths), made, sorted(tmp_path.glob("cronium-api-*"))

    paths, made, left = asyncio.run(scenario())
    assert len(paths) == 1 and [next(iter(paths)).parent] == made, (paths, made)
    assert left == []
