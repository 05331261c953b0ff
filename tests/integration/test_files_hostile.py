"""File transfers against hostile surroundings, amd64 and arm64: another user of the server
(the fleet's ``intruder``) who can write in the destination's directory and plants links there,
a remote file that grows while it is fetched, another local user racing for the fetch's
temporary file, and file errors (local or remote) that must name the file. In each case we
must not write, chmod or read through a link someone else planted, and nothing may be lent
more rights than the caller asked for. What is on a server is checked with ``docker exec``
(the fleet's own view), never with the code under test."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

import cronium_nb as cn
from cronium_nb import Fleet
from cronium_nb.transfer import CLEANUP_TIMEOUT_S
from tests.integration.test_files import ARCHES, remote_sha256, rows, server_of, temp_files

pytestmark = pytest.mark.fleet
MIB = 1024 * 1024
# a directory the intruder may write in and that is not sticky: they can rename and replace
# what we create there (as in a group-writable deploy directory)
SHARED = "/srv/hostile-shared"


def describe(fleet: Fleet, server: str, path: str) -> str:
    """``mode owner type size`` of ``path`` itself (a link is not followed), by docker exec."""
    result = fleet.exec(server, ["stat", "-c", "%a %U %F %s", path])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def as_intruder(fleet: Fleet, server: str, script: str) -> None:
    result = fleet.exec(server, ["sh", "-c", script], user="intruder")
    assert result.exit_code == 0, result.output


def fresh_shared_dir(fleet: Fleet, server: str, *also: str) -> None:
    """An empty ``SHARED`` (0777, not sticky) and empty root-only paths ``also``."""
    script = f"rm -rf {SHARED} {' '.join(also)} && mkdir -m 777 {SHARED} && chmod 777 {SHARED}"
    assert fleet.exec(server, ["sh", "-c", script]).exit_code == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_a_planted_link_to_a_directory_does_not_lead_the_put_there(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    server = server_of(cronium_fleet, arch).name
    private = "/srv/hostile-private"
    fresh_shared_dir(cronium_fleet, server, private)
    assert cronium_fleet.exec(server, ["mkdir", "-m", "700", private]).exit_code == 0
    as_intruder(cronium_fleet, server, f"ln -s {private} {SHARED}/app.bin")
    local = tmp_path / "payload.txt"
    local.write_text("payload\n")
    executor = executor_factory(cronium_fleet.inventory)

    row = rows(executor.put(local, f"{SHARED}/app.bin", servers=[server]))[server]
    assert row["status"] == "failed", row
    assert row["error"] == (
        f"cannot write {SHARED}/app.bin: it is a symbolic link to a directory; "
        "end the path with '/' to put the file into the directory it points to"
    )
    assert cronium_fleet.exec(server, ["ls", "-A", private]).output.strip() == ""
    assert temp_files(cronium_fleet, server, SHARED) == []

    # the caller who means the directory says so
    row = rows(executor.put(local, f"{SHARED}/app.bin/", servers=[server]))[server]
    assert row["status"] == "success" and row["path"] == f"{SHARED}/app.bin/payload.txt", row
    assert cronium_fleet.exec(server, ["cat", f"{private}/payload.txt"]).output == "payload\n"


@pytest.mark.parametrize("arch", ARCHES)
def test_a_replaced_link_or_foreign_file_lends_no_setuid_bit(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """The new file takes the replaced file's mode only from a regular file (never from what a
    link points to), and its setuid/setgid bits only when the owner (group) stays the same:
    a root upload must not become setuid root because the file it replaced was setuid to
    someone else."""
    server = server_of(cronium_fleet, arch).name
    suid_target = "/srv/hostile-suid"
    fresh_shared_dir(cronium_fleet, server, suid_target)
    setup = f"echo root-tool > {suid_target} && chmod 4755 {suid_target} && cp -p {suid_target} {SHARED}/root-tool"
    assert cronium_fleet.exec(server, ["sh", "-c", setup]).exit_code == 0
    as_intruder(cronium_fleet, server, f"ln -s {suid_target} {SHARED}/tool")
    as_intruder(cronium_fleet, server, f"echo mine > {SHARED}/own-tool && chmod 6755 {SHARED}/own-tool")
    assert describe(cronium_fleet, server, f"{SHARED}/own-tool").startswith("6755 intruder regular file")
    local = tmp_path / "tool"
    local.write_text("new tool\n")
    size = local.stat().st_size
    executor = executor_factory(cronium_fleet.inventory)

    put = rows(executor.put(local, f"{SHARED}/tool", servers=[server]))[server]
    assert put["status"] == "success", put
    assert describe(cronium_fleet, server, f"{SHARED}/tool") == f"644 root regular file {size}"  # the link replaced
    assert describe(cronium_fleet, server, suid_target) == "4755 root regular file 10"  # never touched
    assert cronium_fleet.exec(server, ["cat", suid_target]).output == "root-tool\n"

    put = rows(executor.put(local, f"{SHARED}/own-tool", servers=[server]))[server]
    assert put["status"] == "success", put
    assert describe(cronium_fleet, server, f"{SHARED}/own-tool") == f"755 root regular file {size}"

    # the same owner replacing its own setuid file keeps it setuid (a new version of a tool)
    put = rows(executor.put(local, f"{SHARED}/root-tool", servers=[server]))[server]
    assert put["status"] == "success", put
    assert describe(cronium_fleet, server, f"{SHARED}/root-tool") == f"4755 root regular file {size}"
    # and an explicit mode is the caller's decision
    put = rows(executor.put(local, f"{SHARED}/own-tool", servers=[server], mode=0o4750))[server]
    assert describe(cronium_fleet, server, f"{SHARED}/own-tool") == f"4750 root regular file {size}"


@pytest.mark.parametrize("arch", ARCHES)
def test_a_link_swapped_in_for_the_temporary_file_is_neither_chmodded_nor_installed(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """Mid-upload the intruder moves our temporary file away and puts a link to a root-only
    file in its place. For the link to pass the checksum it points to a file with the same
    bytes (the race the test stands in for swaps the link's target after the check). The mode
    must be set on the file we opened, never through the name, and the link never becomes the
    destination."""
    server = server_of(cronium_fleet, arch).name
    victim = "/srv/hostile-victim"
    fresh_shared_dir(cronium_fleet, server, victim)
    size = 3 * MIB
    make_victim = f"head -c {size} /dev/zero > {victim} && chmod 600 {victim}"
    assert cronium_fleet.exec(server, ["sh", "-c", make_victim]).exit_code == 0
    local = tmp_path / "zeros.bin"
    local.write_bytes(bytes(size))
    swapped: list[str] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not swapped:  # on the executor's loop: blocks it for the docker exec, once
            (temp,) = temp_files(cronium_fleet, name, SHARED)
            as_intruder(cronium_fleet, name, f"cd {SHARED} && mv {temp} moved && ln -s {victim} {temp}")
            swapped.append(temp)

    executor = executor_factory(cronium_fleet.inventory)
    row = rows(executor.put(local, f"{SHARED}/zeros.bin", servers=[server], progress=progress))[server]
    assert swapped
    assert describe(cronium_fleet, server, victim) == f"600 root regular file {size}"  # not chmodded
    assert row["status"] == "failed", row
    assert row["error"] == (
        f"cannot replace {SHARED}/zeros.bin: its temporary file {SHARED}/{swapped[0]} was replaced "
        "by someone else (now a symbolic link); the destination was left unchanged"
    )
    listing = cronium_fleet.exec(server, ["ls", "-A", SHARED]).output.split()
    assert sorted(listing) == ["moved"]  # no destination; the planted link removed, not followed


@pytest.mark.parametrize("arch", ARCHES)
def test_a_file_that_grows_while_fetched_is_copied_as_it_was_when_opened(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """A busy log keeps growing: reading to its end would never finish and fill the local
    disk. The fetch copies (and verifies) the bytes the file had when it was opened."""
    server = server_of(cronium_fleet, arch).name
    path = "/tmp/hostile-growing.log"
    assert cronium_fleet.exec(server, ["sh", "-c", f"head -c {8 * MIB} /dev/urandom > {path}"]).exit_code == 0
    original = remote_sha256(cronium_fleet, server, path)
    grown: list[int] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not grown:  # after the first piece: the writer appends as much again
            append = cronium_fleet.exec(name, ["sh", "-c", f"head -c {8 * MIB} /dev/urandom >> {path}"])
            assert append.exit_code == 0
            grown.append(done)

    executor = executor_factory(cronium_fleet.inventory)
    row = rows(executor.fetch(path, servers=[server], dest=tmp_path / "out", progress=progress))[server]
    assert grown and describe(cronium_fleet, server, path).endswith(f" {16 * MIB}")
    assert (row["status"], row["bytes"], row["sha256"]) == ("success", 8 * MIB, original), row
    assert hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() == original


@pytest.mark.parametrize("arch", ARCHES)
def test_a_local_link_raced_in_for_the_fetch_temporary_file_is_not_written_through(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local user who can write in ``DEST/<server>`` (a shared /tmp directory) replaces
    the temporary file by a link to one of our files right after it is created. We keep writing
    to the file we created and refuse to rename whatever is at its name now."""
    server = server_of(cronium_fleet, arch).name
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    create = tempfile.mkstemp

    def mkstemp_then_raced(*args: object, **kwargs: object) -> tuple[int, str]:
        descriptor, path = create(*args, **kwargs)  # type: ignore[call-overload]
        os.unlink(path)  # the other user's move in the window after the file was created
        os.symlink(victim, path)
        return descriptor, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_raced)
    executor = executor_factory(cronium_fleet.inventory)
    dest = tmp_path / "out"
    row = rows(executor.fetch("/etc/hostname", servers=[server], dest=dest))[server]
    assert victim.read_text() == "mine\n"  # not written through the link
    assert row["status"] == "failed" and "was replaced by someone else" in row["error"], row
    assert not (dest / server / "hostname").exists()


@pytest.mark.parametrize("arch", ARCHES)
def test_a_pseudo_file_that_says_size_zero_is_read_to_its_end(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """/proc and /sys files report size 0 and are only known by reading them: the size bound
    of a growing file does not apply to them."""
    server = server_of(cronium_fleet, arch).name
    expected = cronium_fleet.exec(server, ["cat", "/proc/sys/kernel/hostname"]).output
    assert expected.strip()
    executor = executor_factory(cronium_fleet.inventory)
    row = rows(executor.fetch("/proc/sys/kernel/hostname", servers=[server], dest=tmp_path / "out"))[server]
    assert row["status"] == "success" and row["bytes"] == len(expected.encode()), row
    assert Path(row["path"]).read_text() == expected


@pytest.mark.parametrize("arch", ARCHES)
def test_file_errors_name_the_file_not_the_connection(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """A local disk error (here a directory where the fetched file goes; a full disk alike) and
    a read the server fails are this server's clear failure, not "connection failed"."""
    server = server_of(cronium_fleet, arch).name
    executor = executor_factory(cronium_fleet.inventory)
    in_the_way = tmp_path / "out" / server / "hostname"
    in_the_way.mkdir(parents=True)
    row = rows(executor.fetch("/etc/hostname", servers=[server], dest=tmp_path / "out"))[server]
    assert (row["status"], row["error"]) == ("failed", f"cannot write {in_the_way}: Is a directory"), row
    assert os.listdir(in_the_way.parent) == ["hostname"]  # the temporary file removed

    # reading memory the server process does not map fails on the server, after the open
    row = rows(executor.fetch("/proc/self/mem", servers=[server], dest=tmp_path / "mem"))[server]
    assert row["status"] == "failed" and row["error"].startswith("cannot read /proc/self/mem: "), row
    assert not (tmp_path / "mem" / server / "mem").exists()


@pytest.mark.parametrize("arch", ARCHES)
def test_a_server_that_freezes_mid_transfer_ends_within_its_timeout(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """The server stops answering after the first piece (its container paused). The timeout
    ends the transfer, and the cleanup that follows (closing the file and the SFTP session,
    removing the temporary file) is bounded as a whole: nothing waits for the keepalive, set
    long here so that only our own bound can end it."""
    server = server_of(cronium_fleet, arch).name
    local = tmp_path / "eight.bin"
    local.write_bytes(os.urandom(8 * MIB))
    executor = executor_factory(cronium_fleet.inventory, ssh_options=cn.SSHOptions(keepalive_interval=60))
    paused: list[str] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not paused:
            cronium_fleet.pause(name)
            paused.append(name)

    try:
        job = executor.submit_put(local, "/tmp/hostile-freeze.bin", servers=[server], timeout=15, progress=progress)
        frame = job.result(timeout=300)
    finally:
        if paused:
            cronium_fleet.unpause(server)
    row = rows(frame)[server]
    assert paused and (row["status"], row["error"]) == ("timeout", "the transfer did not finish within 15 s"), row
    # generous: the keepalive alone would have ended it after about 3 minutes
    assert row["duration_s"] < 15 + CLEANUP_TIMEOUT_S + 20, row


def test_a_local_file_that_grows_during_a_put_reaches_every_server_as_it_was_at_the_start(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path
) -> None:
    """A local log still being appended to: every server gets the same bytes, the size the file
    had when the put was started, not whatever each server's reader found at its end."""
    local = tmp_path / "growing.log"
    local.write_bytes(os.urandom(4 * MIB))
    original = hashlib.sha256(local.read_bytes()).hexdigest()
    appended: list[str] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not appended:  # after the first piece to the first server: the writer appends as much again
            with open(local, "ab") as log:
                log.write(os.urandom(4 * MIB))
            appended.append(name)

    executor = executor_factory(cronium_fleet.inventory)
    put = rows(executor.put(local, "/tmp/hostile-growing-put.log", servers="all", progress=progress))
    assert appended and local.stat().st_size == 8 * MIB
    for name, row in put.items():
        assert (row["status"], row["bytes"], row["sha256"]) == ("success", 4 * MIB, original), row
        assert remote_sha256(cronium_fleet, name, "/tmp/hostile-growing-put.log") == original


@pytest.mark.parametrize("arch", ARCHES)
def test_an_sftp_session_that_dies_mid_put_is_a_lost_connection_and_leaves_no_temporary_file(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    server = server_of(cronium_fleet, arch).name
    directory = "/tmp/hostile-lost"
    assert cronium_fleet.exec(server, ["sh", "-c", f"rm -rf {directory} && mkdir {directory}"]).exit_code == 0
    local = tmp_path / "eight.bin"
    local.write_bytes(os.urandom(8 * MIB))
    killed: list[int] = []

    def progress(name: str, done: int, total: int | None) -> None:
        if not killed:  # the server's SFTP process dies; sshd and the SSH connection live on
            killed.append(cronium_fleet.exec(name, ["pkill", "-KILL", "-x", "sftp-server"]).exit_code)

    executor = executor_factory(cronium_fleet.inventory)
    row = rows(executor.put(local, f"{directory}/eight.bin", servers=[server], progress=progress))[server]
    assert killed == [0]
    assert row["status"] == "failed" and row["error"].startswith("connection to "), row["error"]
    assert cronium_fleet.exec(server, ["ls", "-A", directory]).output.strip() == ""  # removed on a new session
