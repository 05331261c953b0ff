"""The deploy's install script, run by a local ``sh`` in a home of its own: a damaged upload is
refused with the reason and leaves nothing behind; an intact one installs a runner that runs."""

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
    HostInfo,
    RunnerBuild,
    RunnerBuilds,
    remote_script,
)


def install(home: Path, upload: bytes) -> subprocess.CompletedProcess[bytes]:
    build = RunnerBuilds(runner_dist()).choose(HostInfo(os.uname().machine))
    command = remote_script(INSTALL_SCRIPT, build)
    return subprocess.run(
        command, shell=True, input=upload, capture_output=True, env={"HOME": str(home), "PATH": os.environ["PATH"]}
    )


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
