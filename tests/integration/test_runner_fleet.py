"""The runner binary inside fleet containers of both architectures, on the bare variant (no
Python, no Node) and the full one, driven over SSH as the executor drives it (payload and
control on stdin, frames on stdout)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cronium_nb import Fleet
from cronium_nb.model import Server
from cronium_nb.protocol import RunnerExit
from tests.conftest import REPO_ROOT
from tests.runner_harness import (
    SshRun,
    connect,
    grandchildren_script,
    leftover_processes,
    make_payload,
    processes_matching,
    run_over_ssh,
)
from tests.unit.test_runner_local import HELPER_EXPECTED_STDOUT, HELPER_SCRIPTS, dedent_shell

pytestmark = pytest.mark.fleet
DIST = REPO_ROOT / "runner" / "dist"
REMOTE_DIR = "/opt/cronium-test"
MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Target:
    fleet: Fleet
    server: Server
    variant: str
    runner: list[str]

    @property
    def name(self) -> str:
        return self.server.name


def binary(arch: str) -> Path:
    path = DIST / f"cronium-runner-linux-{arch}"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make runner`")
    return path


async def install_runner(server: Server, arch: str) -> list[str]:
    """Copy the runner binary to the server by SFTP (the executor's cached deployment comes later)."""
    local = binary(arch)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    async with await connect(server) as connection:
        await connection.run(f"mkdir -p {REMOTE_DIR}", check=True)
        async with connection.start_sftp_client() as sftp:
            await sftp.put(str(local), f"{REMOTE_DIR}/cronium-runner")
        check = f"cd {REMOTE_DIR} && echo '{digest}  cronium-runner' | sha256sum -c --quiet && chmod 700 cronium-runner"
        await connection.run(check, check=True)
    return [f"{REMOTE_DIR}/cronium-runner"]


class Targets:
    """Runner installs on the fleets, made on first use: ``targets["arm64-bare"]``."""

    def __init__(self, full: Fleet, bare: Fleet) -> None:
        self._fleets = {"bare": bare, "full": full}
        self._installed: dict[str, Target] = {}

    def __getitem__(self, key: str) -> Target:
        if key not in self._installed:
            arch, variant = key.split("-")
            fleet = self._fleets[variant]
            server = next(s for s in fleet.servers if fleet.member(s.name).arch == arch)
            runner = asyncio.run(install_runner(server, arch))
            self._installed[key] = Target(fleet, server, variant, runner)
        return self._installed[key]


@pytest.fixture(scope="session")
def targets(cronium_fleet: Fleet, cronium_bare_fleet: Fleet) -> Targets:
    return Targets(cronium_fleet, cronium_bare_fleet)


TARGET_IDS = ["amd64-bare", "arm64-bare", "amd64-full", "arm64-full"]


@pytest.fixture(params=TARGET_IDS)
def target(request, targets: Targets) -> Target:
    return targets[request.param]


def run(target: Target, archive, **kwargs):
    return asyncio.run(run_over_ssh(target.server, target.runner, archive, **kwargs))


def test_version_reports_the_static_build_and_architecture(target: Target) -> None:
    async def version() -> str:
        async with await connect(target.server) as connection:
            result = await connection.run(" ".join([*target.runner, "version", "--json"]), check=True)
            return str(result.stdout)

    info = json.loads(asyncio.run(version()))
    assert info["flavour"] == "static"
    assert info["arch"] == MACHINES[target.fleet.member(target.name).arch]


def test_the_runner_needs_no_python(targets: Targets) -> None:
    for key in ("amd64-bare", "arm64-bare"):
        target = targets[key]
        assert "python3" not in target.fleet.exec(target.name, "command -v python3 || echo none").output
        report = run(target, make_payload("echo ok"))
        assert report.text == "ok\n"


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 137)])
def test_exit_codes(target: Target, script: str, code: int) -> None:
    report = run(target, make_payload(script))
    assert (report.exit_status, report.result["exit_code"]) == (code, code)


def test_helpers_round_trip(target: Target) -> None:
    types = ["bash", "sh"] if target.variant == "bare" else ["bash", "sh", "python", "node"]
    context = {"execution_id": "exec-1", "server": "srv-1", "input": {"n": 5}, "variables": {"seeded": True}}
    for script_type in types:
        script = HELPER_SCRIPTS[script_type]
        script = dedent_shell(script) if script_type in ("bash", "sh") else script
        report = run(target, make_payload(script, script_type, name="helpers"), context=context)
        stdout = [line.decode() for stream, line in report.lines if stream == "stdout"]
        assert stdout == HELPER_EXPECTED_STDOUT, (script_type, report.text, bytes(report.stderr))
        assert report.result["outputs"] == {"sum": 3}
        assert report.result["variables"] == {"greeting": "hello world", "list": [1, 2], "seeded": True}


def test_python_script_on_bare_server_names_the_missing_interpreter(targets: Targets) -> None:
    report = run(targets["arm64-bare"], make_payload("print(1)", "python"))
    assert report.exit_status == RunnerExit.INTERPRETER_MISSING
    assert "python3" in report.result["runner_error"]["message"]


def remote_processes(target: Target, pattern: str) -> list[str]:
    return processes_matching(target.fleet, target.name, pattern)


GRANDCHILDREN = grandchildren_script(4000)
TRAPPED = "trap 'echo got TERM' TERM\necho ready\nwhile true; do sleep 0.05; done\n"


@pytest.mark.parametrize(("script", "expected_code"), [(GRANDCHILDREN, 143), (TRAPPED, 137)], ids=["tree", "trap"])
def test_sigterm_to_runner_leaves_nothing_running(target: Target, script: str, expected_code: int) -> None:
    async def scenario():
        async with await connect(target.server) as connection:
            archive = make_payload(script, grace_period=2)
            running = await SshRun.start(connection, target.runner, archive)
            report = await running.read_until(lambda r: b"ready" in r.stdout)
            runner_pid = report.message("hello")["pid"]
            kill = await asyncio.to_thread(target.fleet.exec, target.name, f"kill -TERM {runner_pid}")
            assert kill.exit_code == 0, kill.output
            return await running.finish()

    report = asyncio.run(scenario())
    assert report.result["stop_reason"] == "runner received SIGTERM"
    assert report.result["exit_code"] == expected_code
    assert remote_processes(target, r"sleep 400\d|while true") == []


def test_checksum_mismatch_and_traversal_are_refused(target: Target) -> None:
    marker = "/tmp/cronium-should-not-exist"
    report = run(target, make_payload(f"touch {marker}"), sha256="f" * 64)
    assert report.exit_status == RunnerExit.CHECKSUM_MISMATCH
    evil = make_payload(f"touch {marker}", extra_files={"../../escaped": b"x"})
    report = run(target, evil)
    assert report.exit_status == RunnerExit.BAD_PAYLOAD
    check = target.fleet.exec(target.name, f"ls {marker} ~/.cache/cronium/escaped ~/.cache/escaped 2>&1; true")
    assert check.output.count("No such file") == 3


BIG_OUTPUT = """
head -c 52428800 /dev/urandom > blob
head -c 5242880 /dev/zero | tr '\\0' 'x' >> blob
cat blob
sha256sum blob >&2
"""


def test_fifty_megabytes_binary_and_a_long_line_arrive_intact(target: Target) -> None:
    report = run(target, make_payload(BIG_OUTPUT, timeout=600))
    assert report.result["exit_code"] == 0
    remote_sha = bytes(report.stderr).split()[0].decode()
    assert len(report.stdout) == 52428800 + 5242880
    assert hashlib.sha256(report.stdout).hexdigest() == remote_sha
    assert report.stdout.endswith(b"x" * 5242880)


def test_script_reading_stdin_ends(target: Target) -> None:
    report = run(target, make_payload('cat; echo "stdin closed"'))
    assert report.text == "stdin closed\n"


def test_lost_connection_stops_the_script(target: Target) -> None:
    async def scenario():
        connection = await connect(target.server)
        running = await SshRun.start(connection, target.runner, make_payload("echo ready; sleep 4004"))
        await running.read_until(lambda r: b"ready" in r.stdout)
        connection.abort()

    asyncio.run(scenario())

    async def wait_gone():
        for _ in range(300):  # the runner notices stdin EOF; bounded poll, 30 s at most
            if not await asyncio.to_thread(leftover_processes, target.fleet, target.name, r"sleep 4004"):
                return True
            await asyncio.sleep(0.1)
        return False

    assert asyncio.run(wait_gone()), leftover_processes(target.fleet, target.name, r"sleep 4004")
