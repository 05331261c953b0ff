"""Files in and out (``Executor.put`` / ``fetch``, ``%cronium_put`` / ``%cronium_fetch``) against
the real sshd fleet, amd64 and arm64: checksums end to end, hostile paths, one server's failure
staying its own, private temporary files, atomic replacement, no escape from ``dest``, cancel
and timeout. What is on a server is checked with ``docker exec`` (the fleet's own view), never
with the code under test."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

import cronium_nb as cn
from cronium_nb import Fleet
from cronium_nb.transfer import COLUMNS

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
BIG = 50 * 1000 * 1000  # bytes
CANARY = "cronium-files-canary"  # relative: a command run by a shell would create it in its cwd
# spaces, both quotes, non-ASCII, and shell syntax that must never run (no '/' in the name)
HOSTILE_DIR = f"/tmp/d ir 'q' \"dq\" ü 日本 $(touch /tmp/{CANARY}-1)"
HOSTILE_NAME = f"f 'i' \"l\" é `touch {CANARY}-2`; touch {CANARY}-3 .txt"


def server_of(fleet: Fleet, arch: str) -> cn.Server:
    return next(s for s in fleet.servers if s.name.startswith(arch))


def as_user(server: cn.Server, user: str) -> cn.Server:
    """The same container, logged in as another of the fleet's users (its key is authorized)."""
    return dataclasses.replace(server, name=f"{server.name}-as-{user}", user=user)


def remote_sha256(fleet: Fleet, name: str, path: str) -> str:
    result = fleet.exec(name, ["sha256sum", path])
    assert result.exit_code == 0, result.output
    return result.output.split()[0]


def remote_stat(fleet: Fleet, name: str, path: str) -> str:
    """``mode owner size`` of a remote file, by docker exec."""
    result = fleet.exec(name, ["stat", "-c", "%a %U %s", path])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def temp_files(fleet: Fleet, name: str, directory: str) -> list[str]:
    listing = fleet.exec(name, ["ls", "-a", directory]).output.split("\n")
    return [entry for entry in listing if ".cronium-" in entry]


def rows(frame: pd.DataFrame) -> dict[str, dict]:
    assert list(frame.columns) == list(COLUMNS)
    return {row["server"]: row for row in frame.to_dict("records")}


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    with open(path, "wb") as out:
        for _ in range(BIG // 1_000_000):
            out.write(os.urandom(1_000_000))
    return path


def test_put_then_fetch_50_mb_same_sha256_on_every_server_and_back(
    cronium_fleet: Fleet, executor_factory, big_file: Path, tmp_path: Path
) -> None:
    local_sha = hashlib.sha256(big_file.read_bytes()).hexdigest()
    executor = executor_factory(cronium_fleet.inventory)
    seen: dict[str, list[tuple[int, int | None]]] = {}
    lock = threading.Lock()

    def progress(server: str, done: int, total: int | None) -> None:
        with lock:
            seen.setdefault(server, []).append((done, total))

    put = rows(executor.put(big_file, "/tmp/files-big.bin", servers="all", progress=progress))
    assert set(put) == set(cronium_fleet.names)
    for name, row in put.items():
        assert (row["status"], row["error"], row["bytes"], row["sha256"]) == ("success", None, BIG, local_sha), row
        assert isinstance(row["duration_s"], float)
        assert row["path"] == "/tmp/files-big.bin"
        assert remote_sha256(cronium_fleet, name, "/tmp/files-big.bin") == local_sha
        assert remote_stat(cronium_fleet, name, "/tmp/files-big.bin") == f"644 root {BIG}"  # the default mode
        assert temp_files(cronium_fleet, name, "/tmp") == []
        dones = [done for done, _ in seen[name]]
        assert dones == sorted(dones) and dones[-1] == BIG and len(dones) > 10  # streamed in pieces
        assert {total for _, total in seen[name]} == {BIG}

    dest = tmp_path / "fetched"
    fetched = rows(executor.fetch("/tmp/files-big.bin", servers="all", dest=dest))
    for name, row in fetched.items():
        local = dest / name / "files-big.bin"
        assert (row["status"], row["bytes"], row["sha256"], row["path"]) == ("success", BIG, local_sha, str(local))
        assert hashlib.sha256(local.read_bytes()).hexdigest() == local_sha
        assert os.listdir(dest / name) == ["files-big.bin"]  # no partial file left
        assert local.stat().st_mode & 0o777 == 0o600  # private, like the temporary file it was
    recorded = executor.transfers()[["direction", "server", "sha256", "status"]]
    assert sorted(map(tuple, recorded.values.tolist())) == sorted(
        (direction, name, local_sha, "success") for direction in ("put", "fetch") for name in cronium_fleet.names
    )


@pytest.mark.parametrize("arch", ARCHES)
def test_paths_with_spaces_quotes_and_non_ascii_arrive_verbatim(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    server = server_of(cronium_fleet, arch)
    assert cronium_fleet.exec(server.name, ["mkdir", "-p", HOSTILE_DIR]).exit_code == 0
    local = tmp_path / "ünïcode 'local' file.txt"
    local.write_bytes(b"hello \xff\x00 binary\n" * 1000)
    remote = f"{HOSTILE_DIR}/{HOSTILE_NAME}"
    executor = executor_factory(cronium_fleet.inventory)

    put = rows(executor.put(local, remote, servers=[server.name], mode=0o600))[server.name]
    assert put["status"] == "success", put
    assert remote_stat(cronium_fleet, server.name, remote) == f"600 root {local.stat().st_size}"
    assert remote_sha256(cronium_fleet, server.name, remote) == hashlib.sha256(local.read_bytes()).hexdigest()

    # a directory as the destination keeps the local file's name
    into_dir = rows(executor.put(local, HOSTILE_DIR, servers=[server.name]))[server.name]
    assert into_dir["status"] == "success" and into_dir["path"] == f"{HOSTILE_DIR}/{local.name}", into_dir
    assert cronium_fleet.exec(server.name, ["test", "-f", into_dir["path"]]).exit_code == 0

    got = rows(executor.fetch(remote, servers=[server.name], dest=tmp_path / "out"))[server.name]
    assert got["status"] == "success", got
    assert Path(got["path"]) == tmp_path / "out" / server.name / HOSTILE_NAME
    assert Path(got["path"]).read_bytes() == local.read_bytes()
    assert temp_files(cronium_fleet, server.name, HOSTILE_DIR) == []
    canaries = cronium_fleet.exec(server.name, ["sh", "-c", f'ls / /tmp ~ "$HOME" | grep -c {CANARY}']).output
    assert canaries.strip() == "0"  # none of the embedded commands ran


@pytest.mark.parametrize("missing_on", ARCHES)
def test_a_missing_file_fails_only_its_server(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, missing_on: str
) -> None:
    path = f"/tmp/files-only-some-{missing_on}"
    for server in cronium_fleet.servers:
        cronium_fleet.exec(server.name, ["rm", "-f", path])
        if not server.name.startswith(missing_on):
            assert cronium_fleet.exec(server.name, ["sh", "-c", f"echo here > {path}"]).exit_code == 0
    executor = executor_factory(cronium_fleet.inventory)
    fetched = rows(executor.fetch(path, servers="all", dest=tmp_path / "out"))
    for name, row in fetched.items():
        if name.startswith(missing_on):
            assert row["status"] == "failed" and row["error"] == f"cannot read {path}: No such file", row
            assert row["sha256"] is None and not (tmp_path / "out" / name).exists()
        else:
            assert row["status"] == "success" and Path(row["path"]).read_text() == "here\n", row
    # put into a directory that exists on one server only
    local = tmp_path / "small.txt"
    local.write_text("small\n")
    directory = f"/tmp/files-dir-{missing_on}"
    for server in cronium_fleet.servers:
        cronium_fleet.exec(server.name, ["rm", "-rf", directory])
        if not server.name.startswith(missing_on):
            cronium_fleet.exec(server.name, ["mkdir", directory])
    put = rows(executor.put(local, f"{directory}/small.txt", servers="all"))
    for name, row in put.items():
        if name.startswith(missing_on):
            assert row["status"] == "failed", row
            assert row["error"] == f"cannot write {directory}/small.txt: no such directory {directory}"
        else:
            assert row["status"] == "success", row


@pytest.mark.parametrize("unprivileged", ARCHES)
def test_a_permission_error_fails_only_its_server(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, unprivileged: str
) -> None:
    """The fleet logs in as root; the same container logged in as the user ``cronium`` meets
    real permission errors: a root-only file, a root-only directory."""
    secret = "/tmp/files-root-only.txt"
    targets = []
    for server in cronium_fleet.servers:
        command = f"echo secret > {secret}; chmod 600 {secret}; rm -rf /srv/root-only; mkdir -m 700 /srv/root-only"
        assert cronium_fleet.exec(server.name, ["sh", "-c", command]).exit_code == 0
        targets.append(as_user(server, "cronium") if server.name.startswith(unprivileged) else server)
    executor = executor_factory(cn.Inventory(targets))

    fetched = rows(executor.fetch(secret, servers=targets, dest=tmp_path / "out"))
    put = rows(executor.put(__file__, "/srv/root-only/x.py", servers=targets))
    for target in targets:
        if target.user == "cronium":
            assert fetched[target.name]["status"] == "failed"
            assert fetched[target.name]["error"] == f"cannot read {secret}: Permission denied"
            assert put[target.name]["status"] == "failed"
            assert put[target.name]["error"] == "cannot write /srv/root-only/x.py: Permission denied"
        else:
            assert fetched[target.name]["status"] == "success"
            assert Path(fetched[target.name]["path"]).read_text() == "secret\n"
            assert put[target.name]["status"] == "success"
    root_view = cronium_fleet.exec(server_of(cronium_fleet, unprivileged).name, ["ls", "-A", "/srv/root-only"])
    assert root_view.output.strip() == ""  # nothing was left by the refused put


@pytest.mark.parametrize("arch", ARCHES)
def test_the_temporary_file_is_private_and_the_replacement_atomic(
    cronium_fleet: Fleet, executor_factory, big_file: Path, arch: str
) -> None:
    """Mid-transfer (seen from the first progress call) the data sits in a 0600 temporary file
    next to the destination, while the destination still holds the old file, whole."""
    server = server_of(cronium_fleet, arch)
    directory, dest = "/tmp/files-atomic", "/tmp/files-atomic/app.bin"
    setup = f"rm -rf {directory} && mkdir {directory} && echo old > {dest} && chmod 640 {dest}"
    assert cronium_fleet.exec(server.name, ["sh", "-c", setup]).exit_code == 0
    observed: list[tuple[str, str, str]] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not observed:  # on the executor's loop: blocks it for one docker exec, once
            temps = temp_files(cronium_fleet, name, directory)
            modes = cronium_fleet.exec(name, ["sh", "-c", f"stat -c '%a %U' {directory}/.*.part"]).output.strip()
            content = cronium_fleet.exec(name, ["cat", dest]).output
            observed.append((" ".join(temps), modes, content))

    executor = executor_factory(cronium_fleet.inventory)
    row = rows(executor.put(big_file, dest, servers=[server.name], progress=progress))[server.name]
    assert row["status"] == "success", row
    temps, modes, content = observed[0]
    assert temps.startswith(".app.bin.cronium-") and temps.endswith(".part"), temps
    assert modes == "600 root"
    assert content == "old\n"
    assert remote_stat(cronium_fleet, server.name, dest) == f"640 root {BIG}"  # the replaced file's mode kept
    assert temp_files(cronium_fleet, server.name, directory) == []
    again = rows(executor.put(big_file, dest, servers=[server.name], mode=0o755))[server.name]
    assert again["status"] == "success" and remote_stat(cronium_fleet, server.name, dest) == f"755 root {BIG}"


@pytest.mark.parametrize("arch", ARCHES)
def test_fetch_never_writes_outside_dest(cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str) -> None:
    server = server_of(cronium_fleet, arch)
    executor = executor_factory(cronium_fleet.inventory)
    dest = tmp_path / "dest"
    # Names that would climb out are refused before anything runs: no connection, no file.
    for remote in ["/tmp/files/..", "..", "/tmp/", "~", "/tmp/a\0b", ""]:
        with pytest.raises(ValueError):
            executor.fetch(remote, servers=[server.name], dest=dest)
    for bad_name in ["..", ".", "../escaped", "a/b"]:
        renamed = dataclasses.replace(server, name=bad_name)
        with pytest.raises(ValueError, match="cannot be used as a file name under dest"):
            executor.fetch("/etc/hostname", servers=[renamed], dest=dest)
    assert executor.pool.connection_count() == 0
    assert not dest.exists() and os.listdir(tmp_path) == ["state0"]  # the executor's state dir only

    # Odd but legal remote names stay inside DIR/<server>/.
    odd = ["..hidden", "-rf", "..\\..\\evil", "new\nline"]
    for name in odd:
        assert cronium_fleet.exec(server.name, ["sh", "-c", 'printf x > "/tmp/$1"', "sh", name]).exit_code == 0
        row = rows(executor.fetch(f"/tmp/{name}", servers=[server.name], dest=dest))[server.name]
        assert row["status"] == "success" and Path(row["path"]) == dest / server.name / name, row
    assert sorted(os.listdir(dest)) == [server.name]
    assert sorted(os.listdir(dest / server.name)) == sorted(odd)

    # DIR/<server> made a link to elsewhere (by someone else): refused, nothing written there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / server.name).symlink_to(elsewhere)
    row = rows(executor.fetch("/etc/hostname", servers=[server.name], dest=linked))[server.name]
    assert row["status"] == "failed" and "leads outside" in row["error"], row
    assert os.listdir(elsewhere) == []


def test_bad_input_is_refused_before_anything_runs(cronium_fleet: Fleet, executor_factory, tmp_path: Path) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    local = tmp_path / "f.txt"
    local.write_text("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        executor.put(tmp_path / "missing.txt", "/tmp/x", servers="all")
    with pytest.raises(ValueError, match="not a regular file"):
        executor.put(tmp_path, "/tmp/x", servers="all")
    with pytest.raises(ValueError, match="mode must be"):
        executor.put(local, "/tmp/x", servers="all", mode=0o10000)
    with pytest.raises(ValueError, match="timeout must be"):
        executor.put(local, "/tmp/x", servers="all", timeout=0)
    with pytest.raises(cn.UnknownServerError):
        executor.put(local, "/tmp/x", servers="nope")
    with pytest.raises(ValueError, match="NUL"):
        executor.put(local, "/tmp/x\0y", servers="all")
    with pytest.raises(ValueError, match="not a directory"):
        executor.fetch("/etc/hostname", servers="all", dest=local)
    assert executor.pool.connection_count() == 0


def test_async_twins_and_cancel_leave_nothing_behind(
    cronium_fleet: Fleet, executor_factory, big_file: Path, tmp_path: Path
) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    arm = server_of(cronium_fleet, "arm64")
    cronium_fleet.exec(arm.name, ["rm", "-rf", "/tmp/files-cancel"])
    cronium_fleet.exec(arm.name, ["mkdir", "/tmp/files-cancel"])
    first_piece = threading.Event()
    job = executor.submit_put(
        big_file, "/tmp/files-cancel/big.bin", servers=[arm.name], progress=lambda *_: first_piece.set()
    )
    assert first_piece.wait(120)
    job.cancel()
    row = rows(job.result(timeout=120))[arm.name]
    assert (row["status"], row["error"], row["sha256"]) == ("cancelled", "cancelled", None)
    assert cronium_fleet.exec(arm.name, ["ls", "-A", "/tmp/files-cancel"]).output.strip() == ""  # no temp, no file
    assert executor.transfers()["status"].tolist() == ["cancelled"]  # recorded too

    async def both() -> tuple[pd.DataFrame, pd.DataFrame]:
        small = tmp_path / "small.txt"
        small.write_text("async\n")
        put = await executor.put_async(small, "/tmp/files-async.txt", servers="all")
        return put, await executor.fetch_async("/tmp/files-async.txt", servers="all", dest=tmp_path / "a")

    put, fetched = asyncio.run(both())  # from a loop of the caller's own
    assert set(put["status"]) == {"success"} and set(fetched["status"]) == {"success"}
    for name in cronium_fleet.names:
        assert (tmp_path / "a" / name / "files-async.txt").read_text() == "async\n"

    # closing the executor mid-transfer cancels it the same way
    first_piece.clear()
    job = executor.submit_put(
        big_file, "/tmp/files-cancel/closed.bin", servers=[arm.name], progress=lambda *_: first_piece.set()
    )
    assert first_piece.wait(120)
    executor.close()
    assert rows(job.result(timeout=10))[arm.name]["status"] == "cancelled"
    assert cronium_fleet.exec(arm.name, ["ls", "-A", "/tmp/files-cancel"]).output.strip() == ""


def test_a_server_that_stalls_times_out_alone(cronium_fleet: Fleet, executor_factory, tmp_path: Path) -> None:
    amd = server_of(cronium_fleet, "amd64")
    local = tmp_path / "f.txt"
    local.write_text("x" * 1000)
    executor = executor_factory(cronium_fleet.inventory)
    cronium_fleet.pause(amd.name)
    try:
        frame = rows(executor.put(local, "/tmp/files-stall.txt", servers="all", timeout=10))
    finally:
        cronium_fleet.unpause(amd.name)
    stalled = frame[amd.name]
    assert stalled["status"] == "timeout" and stalled["error"] == "the transfer did not finish within 10 s", stalled
    assert stalled["duration_s"] < 40  # bounded: a frozen server must not hang the call
    others = [row for name, row in frame.items() if name != amd.name]
    assert others and all(row["status"] == "success" for row in others)


def test_magics_put_and_fetch_in_a_kernel(cronium_fleet: Fleet, tmp_path: Path, monkeypatch) -> None:
    from tests.integration.test_notebooks import Kernel, text_of

    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))
    inventory = tmp_path / "servers.yaml"
    servers = [
        {"name": s.name, "host": s.host, "port": s.port, "key_path": s.key_path, "known_hosts": s.known_hosts}
        for s in cronium_fleet.servers
    ]
    inventory.write_text(yaml.safe_dump({"servers": servers}))
    local = tmp_path / "magic file.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    kernel = Kernel({"CRONIUM_DISPLAY": "text"})
    try:
        reply, _ = kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory}")
        assert reply["status"] == "ok"
        reply, messages = kernel.run(f"%cronium_put '{local}' '/tmp/magic put.bin' -s all --mode 640 -o put_res")
        shown = text_of(messages)
        assert reply["status"] == "ok", shown
        for name in cronium_fleet.names:
            assert f"[{name}] 100% (3.0 MiB of 3.0 MiB)" in shown
            assert remote_stat(cronium_fleet, name, "/tmp/magic put.bin") == f"640 root {3 * 1024 * 1024}"
        reply, messages = kernel.run(f"%cronium_fetch '/tmp/magic put.bin' -s all --dest '{tmp_path / 'got'}' -o got")
        assert reply["status"] == "ok", text_of(messages)
        reply, messages = kernel.run("print(sorted(put_res['status']), sorted(got['status']), set(got['sha256']))")
        assert text_of(messages).strip() == f"['success', 'success'] ['success', 'success'] {{'{sha}'}}"
        for name in cronium_fleet.names:
            assert hashlib.sha256((tmp_path / "got" / name / "magic put.bin").read_bytes()).hexdigest() == sha
        for code, expected in {
            "%cronium_put /nonexistent /tmp/x": "does not exist",
            "%cronium_put /etc/hostname /tmp/x --mode 9z": "--mode must be octal",
            "%cronium_fetch /tmp/.. --dest /tmp/out": "cannot be used as a file name",
            "%cronium_fetch /etc/hostname": "--dest",
            "%cronium_fetch /etc/hostname -s nope --dest /tmp/out": "unknown server or group 'nope'",
        }.items():
            reply, messages = kernel.run(code)
            shown = text_of(messages)
            assert "UsageError" in shown and expected in shown and "Traceback" not in shown, (code, shown)
    finally:
        kernel.close()


def test_interrupting_a_put_cell_cancels_it(cronium_fleet: Fleet, big_file: Path, tmp_path: Path, monkeypatch) -> None:
    from tests.integration.test_notebooks import Kernel, idle, text_of

    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))
    arm = server_of(cronium_fleet, "arm64")
    inventory = tmp_path / "servers.yaml"
    entry = {"name": arm.name, "host": arm.host, "port": arm.port, "key_path": arm.key_path}
    inventory.write_text(yaml.safe_dump({"servers": [entry | {"known_hosts": arm.known_hosts}]}))
    cronium_fleet.exec(arm.name, ["sh", "-c", "rm -rf /tmp/files-interrupt && mkdir /tmp/files-interrupt"])
    kernel = Kernel({"CRONIUM_DISPLAY": "text"})
    try:
        kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory}")
        msg_id = kernel.start(f"%cronium_put {big_file} /tmp/files-interrupt/big.bin -s all -o res")
        kernel.messages(msg_id, lambda messages: f"[{arm.name}] 25%" in text_of(messages))
        kernel.manager.interrupt_kernel()
        messages = kernel.messages(msg_id, idle, timeout=60)
        reply = kernel.client.get_shell_msg(timeout=10)["content"]
        shown = text_of(messages)
        assert reply["status"] == "ok" and "Traceback" not in shown, shown
        assert "cancelling the transfer" in shown and "cancelled" in shown
        reply, messages = kernel.run("print(res['status'].tolist())")
        assert text_of(messages).strip() == "['cancelled']"
    finally:
        kernel.close()
    assert cronium_fleet.exec(arm.name, ["ls", "-A", "/tmp/files-interrupt"]).output.strip() == ""


def test_magics_show_progress_in_a_widget(cronium_fleet: Fleet, tmp_path: Path, monkeypatch) -> None:
    from tests.integration.test_notebooks import Kernel

    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))
    inventory = tmp_path / "servers.yaml"
    servers = [
        {"name": s.name, "host": s.host, "port": s.port, "key_path": s.key_path, "known_hosts": s.known_hosts}
        for s in cronium_fleet.servers
    ]
    inventory.write_text(yaml.safe_dump({"servers": servers}))
    local = tmp_path / "widget.bin"
    local.write_bytes(os.urandom(2 * 1024 * 1024))
    kernel = Kernel({"CRONIUM_DISPLAY": "widgets"})
    try:
        kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory}")
        reply, messages = kernel.run(f"%cronium_put {local} /tmp/files-widget.bin -s all")
        assert reply["status"] == "ok"
        assert any(
            m["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
            for m in messages
        )
        states = " ".join(str(m["content"]["data"].get("state", {})) for m in messages if m["msg_type"] == "comm_msg")
        for name in cronium_fleet.names:
            assert f"<b>{name}</b>" in states
        assert "2.0 MiB of 2.0 MiB" in states
        results = [m for m in messages if m["msg_type"] == "execute_result"]
        assert "success" in results[0]["content"]["data"]["text/plain"]
    finally:
        kernel.close()
