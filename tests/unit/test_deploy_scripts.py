"""The deploy's scripts, run by a local ``sh`` in a home of its own: a damaged upload is refused
with the reason and leaves nothing behind; an intact one installs a runner that runs; the probe
and the verify script find it in place, and find every directory that is not private and every
change to the binary."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from cronium_nb.resources import runner_dist
from cronium_nb.ssh.deploy import (
    INSTALL_SCRIPT,
    MISMATCH,
    UNSAFE,
    VERIFY_MISSING,
    VERIFY_SCRIPT,
    HostInfo,
    RunnerBuild,
    RunnerBuilds,
    remote_script,
)


def host_build() -> RunnerBuild:
    return RunnerBuilds(runner_dist()).choose(HostInfo(os.uname().machine))


def run_script(home: Path, command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    environment = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(command, shell=True, input=stdin, capture_output=True, env=environment)


def install(home: Path, upload: bytes) -> subprocess.CompletedProcess[bytes]:
    return run_script(home, remote_script(INSTALL_SCRIPT, host_build()), upload)


def probed_state(home: Path) -> int:
    """The code the probe gives the host's build: 0 good, 3 unsafe, 4 missing, 5 damaged."""
    result = run_script(home, RunnerBuilds(runner_dist()).probe_command())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert f"home {home}" in lines
    (code,) = [int(line.split()[2]) for line in lines if line.startswith(f"build {host_build().remote_name} ")]
    return code


def runner_entries(home: Path) -> list[str]:
    runner_root = home / ".cache" / "cronium" / "runner"
    return sorted(entry.name for entry in runner_root.iterdir()) if runner_root.exists() else []


@pytest.fixture
def upload() -> bytes:
    return RunnerBuilds(runner_dist()).choose(HostInfo(os.uname().machine)).upload()


def test_an_intact_upload_installs_a_runner_that_runs(tmp_path: Path, upload: bytes) -> None:
    result = install(tmp_path, upload)
    assert result.returncode == 0, result.stderr
    (installed,) = runner_entries(tmp_path)
    version = subprocess.run([tmp_path / ".cache/cronium/runner" / installed / "cronium-runner", "version"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert version.stdout.startswith("cronium-runner ")


@pytest.mark.parametrize("damage", ["a flipped byte", "cut short"])
def test_a_damaged_upload_is_refused_and_leaves_nothing(tmp_path: Path, upload: bytes, damage: str) -> None:
    if damage == "a flipped byte":
        middle = len(upload) // 2
        damaged = upload[:middle] + bytes([upload[middle] ^ 0xFF]) + upload[middle + 1 :]
    else:
        damaged = upload[: len(upload) - 100]
    result = install(tmp_path, damaged)
    assert result.returncode == MISMATCH
    assert b"the upload did not arrive intact: gzip:" in result.stderr
    assert runner_entries(tmp_path) == []  # the partial copy went with the failed install


def test_a_build_that_changed_since_its_checksum_is_not_sent(tmp_path: Path) -> None:
    binary = tmp_path / "cronium-runner-linux-amd64"
    binary.write_bytes(b"the build as it was")
    build = RunnerBuild("amd64", binary, "0" * 64, "1")
    with pytest.raises(OSError, match="changed since its checksum was taken"):
        build.upload()
    assert (
        gzip.decompress(RunnerBuild("amd64", binary, hashlib.sha256(binary.read_bytes()).hexdigest(), "1").upload())
        == b"the build as it was"
    )


@pytest.mark.parametrize("present", ["nothing", "the cache dir", "the runner dir, with an old partial upload"])
def test_the_install_makes_what_is_missing_private(tmp_path: Path, upload: bytes, present: str) -> None:
    root = tmp_path / ".cache" / "cronium"
    if present != "nothing":
        root.mkdir(parents=True, mode=0o700)
        root.chmod(0o700)
    if present.startswith("the runner dir"):
        (root / "runner" / ".partial-old").mkdir(parents=True, mode=0o700)
        (root / "runner").chmod(0o700)
        os.utime(root / "runner" / ".partial-old", (0, 0))  # older than the sweep's 10 minutes
    result = install(tmp_path, upload)
    assert result.returncode == 0, result.stderr
    (installed,) = runner_entries(tmp_path)  # the stale partial swept, the upload's dir renamed
    assert not installed.startswith(".partial-")
    for directory in (root, root / "runner", root / "runner" / installed):
        assert directory.stat().st_mode & 0o777 == 0o700, directory


@pytest.fixture
def installed(tmp_path: Path, upload: bytes) -> Path:
    """The host's build installed in tmp_path's home; its directory."""
    assert install(tmp_path, upload).returncode == 0
    return tmp_path / ".cache" / "cronium" / "runner" / host_build().remote_name


def test_the_probe_finds_an_installed_runner_and_a_missing_one(tmp_path: Path, installed: Path) -> None:
    assert probed_state(tmp_path) == 0
    assert probed_state(tmp_path / "elsewhere") == VERIFY_MISSING
    assert run_script(tmp_path, remote_script(VERIFY_SCRIPT, host_build())).returncode == 0


@pytest.mark.parametrize("level", ["the cache dir", "the runner dir", "the build's dir"])
@pytest.mark.parametrize("damage", ["mode 755", "a symlink"])
def test_a_directory_that_is_not_private_is_unsafe(tmp_path: Path, installed: Path, level: str, damage: str) -> None:
    directory = {"the cache dir": installed.parent.parent, "the runner dir": installed.parent}.get(level, installed)
    if damage == "mode 755":
        directory.chmod(0o755)
    else:
        directory.rename(tmp_path / "moved")
        directory.symlink_to(tmp_path / "moved")
    assert probed_state(tmp_path) == UNSAFE
    verified = run_script(tmp_path, remote_script(VERIFY_SCRIPT, host_build()))
    assert verified.returncode == UNSAFE
    assert f"unsafe directory {directory}: it must be a real directory" in verified.stderr.decode()


def test_a_binary_changed_in_place_is_hashed_again_and_refused(tmp_path: Path, installed: Path) -> None:
    binary = installed / "cronium-runner"
    before = binary.stat()
    with binary.open("r+b") as file:  # same size, same inode, mtime put back: only ctime tells
        file.seek(before.st_size // 2)
        file.write(b"\0" * 8)
    os.utime(binary, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert probed_state(tmp_path) == MISMATCH


def test_a_listing_that_changed_is_hashed_again_and_kept_when_the_hash_passes(tmp_path: Path, installed: Path) -> None:
    listing = installed / "listing"
    listing.write_text("an older listing\n")
    assert probed_state(tmp_path) == 0
    binary = (installed / "cronium-runner").stat()
    size, mtime, ctime, inode, mode = listing.read_text().split()  # rewritten after the hash passed
    assert (int(size), int(inode), mode) == (binary.st_size, binary.st_ino, "700")
    assert abs(float(mtime) - binary.st_mtime) < 1e-3 and abs(float(ctime) - binary.st_ctime) < 1e-3
