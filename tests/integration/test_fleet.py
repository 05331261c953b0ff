"""The Docker sshd fleet: both architectures reachable with pinned host keys, both variants,
the fault levers tests rely on, and clean removal."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import asyncssh
import docker
import pytest

from cronium_nb import Fleet
from cronium_nb.fleet import FLEET_LABEL, WORKDIR_OWNER_FILE
from cronium_nb.model import Server
from cronium_nb.store import current_owner
from tests.runner_harness import connect

pytestmark = pytest.mark.fleet
EXPECTED_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


async def ssh_run(server: Server, command: str, *, connect_timeout: float = 30) -> asyncssh.SSHCompletedProcess:
    async with await connect(server, connect_timeout=connect_timeout) as connection:
        return await connection.run(command)


def run(server: Server, command: str, **kwargs) -> asyncssh.SSHCompletedProcess:
    return asyncio.run(ssh_run(server, command, **kwargs))


def fleet_containers(fleet_id: str) -> list:
    return docker.from_env().containers.list(all=True, filters={"label": f"{FLEET_LABEL}={fleet_id}"})


def test_every_server_answers_with_its_architecture(cronium_fleet: Fleet) -> None:
    async def all_unames() -> list[str]:
        results = await asyncio.gather(*(ssh_run(s, "uname -m") for s in cronium_fleet.servers))
        return [str(r.stdout).strip() for r in results]

    machines = asyncio.run(all_unames())
    expected = [EXPECTED_MACHINE[cronium_fleet.member(name).arch] for name in cronium_fleet.names]
    assert machines == expected
    assert {"x86_64", "aarch64"} <= set(machines)


def test_host_keys_are_pinned_and_strict(cronium_fleet: Fleet, tmp_path: Path) -> None:
    server = cronium_fleet.servers[0]
    lines = cronium_fleet.known_hosts.read_text().splitlines()
    assert len(lines) == len(cronium_fleet.servers)
    assert all(line.startswith("[127.0.0.1]:") and " ssh-ed25519 " in line for line in lines)
    # A known_hosts that pins another key for this address must be refused.
    wrong = tmp_path / "known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    wrong.write_text(f"[127.0.0.1]:{server.port} {other_key}")
    impostor = Server(name="x", host=server.host, port=server.port, key_path=server.key_path, known_hosts=str(wrong))
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        run(impostor, "true")


def test_full_variant_has_python_and_node(cronium_fleet: Fleet) -> None:
    for server in cronium_fleet.servers:
        result = run(server, "python3 -c 'print(6*7)' && node -e 'console.log(6*7)'")
        assert result.exit_status == 0, result.stderr
        assert str(result.stdout).split() == ["42", "42"]


def test_bare_variant_has_no_python_or_node(cronium_bare_fleet: Fleet) -> None:
    machines = set()
    for server in cronium_bare_fleet.servers:
        result = run(server, "command -v python3; command -v node; command -v python; uname -m; bash --version")
        assert "python" not in str(result.stdout)
        assert "/node" not in str(result.stdout)
        assert "GNU bash" in str(result.stdout)
        machines.add(str(result.stdout).split("\n")[0].strip())
    assert machines == {"x86_64", "aarch64"}


def test_login_as_unprivileged_user(cronium_fleet_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, user="cronium", name_prefix="user-")
    result = run(fleet.servers[0], "id -un; echo $HOME")
    assert str(result.stdout).split() == ["cronium", "/home/cronium"]


def test_exec_pause_kill_and_restart(cronium_fleet_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="levers-")
    name = fleet.names[0]
    server = fleet.servers[0]
    marker = fleet.exec(name, "echo kept > /root/marker && ps -e -o comm=")
    assert marker.exit_code == 0 and "sshd" in marker.output

    fleet.pause(name)
    try:
        with pytest.raises((asyncio.TimeoutError, asyncssh.Error, OSError)):
            run(server, "true", connect_timeout=2)
    finally:
        fleet.unpause(name)
    assert run(server, "echo back").stdout.strip() == "back"

    fleet.kill_sshd(name)
    assert "sshd" not in fleet.exec(name, "ps -e -o comm=").output
    assert fleet.container(name).status == "running"
    # docker-proxy accepts the TCP connection and drops it at once: a lost connection, or refused.
    with pytest.raises((OSError, asyncssh.ConnectionLost)):
        run(server, "true", connect_timeout=5)

    fleet.restart(name)
    result = run(server, "cat /root/marker")  # same port, same pinned host key, same files
    assert str(result.stdout).strip() == "kept"


def test_down_removes_containers_and_files() -> None:
    fleet = Fleet.up(amd64=1, arm64=1, variant="bare")
    assert len(fleet_containers(fleet.fleet_id)) == 2
    assert fleet.workdir.exists() and fleet.key_path.exists()
    fleet.down()
    assert fleet_containers(fleet.fleet_id) == []
    assert not fleet.workdir.exists()
    # Its own entries only: other test processes make temporary files of their own meanwhile.
    assert [entry for entry in os.listdir(tempfile.gettempdir()) if fleet.fleet_id in entry] == []
    fleet.down()  # a second call is harmless


CRASHING_OWNER = """
import sys, time
from cronium_nb import Fleet
fleet = Fleet.up(amd64=1, arm64=0, variant="bare")
print(fleet.fleet_id, fleet.workdir, flush=True)
time.sleep(600)
"""


def test_cleanup_stale_removes_what_a_killed_process_left() -> None:
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER], stdout=subprocess.PIPE, text=True)
    try:
        fleet_id, workdir = owner.stdout.readline().split()
        assert len(fleet_containers(fleet_id)) == 1
        # While the owner lives, its fleet is not stale.
        Fleet.cleanup_stale()
        assert len(fleet_containers(fleet_id)) == 1
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # Its owner is gone. (Another test process may run cleanup_stale() first: no count is asserted.)
    Fleet.cleanup_stale()
    assert fleet_containers(fleet_id) == []
    assert not Path(workdir).exists()


def test_cleanup_stale_keeps_the_folder_of_a_fleet_still_starting() -> None:
    """Between its folder and its first container, a starting fleet has nothing in Docker:
    its folder names its owner, and cleanup_stale() in another process leaves it alone."""
    workdir = Path(tempfile.mkdtemp(prefix=f"cronium-fleet-{uuid.uuid4().hex[:8]}-"))
    try:
        (workdir / WORKDIR_OWNER_FILE).write_text(current_owner())
        Fleet.cleanup_stale()
        assert workdir.exists()
        (workdir / WORKDIR_OWNER_FILE).write_text("another-machine:1:0")  # an owner that cannot be alive here
        Fleet.cleanup_stale()
        assert not workdir.exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_fleet_inventory_groups(cronium_fleet: Fleet) -> None:
    inventory = cronium_fleet.inventory
    assert [s.name for s in inventory.select("arm64")] == [n for n in cronium_fleet.names if n.startswith("arm64")]
    assert len(inventory.select("fleet")) == len(cronium_fleet.names)
    assert all(s.host == "127.0.0.1" for s in inventory)


def test_bad_fleet_arguments() -> None:
    with pytest.raises(ValueError, match="unknown fleet variant 'tiny'"):
        Fleet.up(variant="tiny")
    with pytest.raises(ValueError, match="not all zero"):
        Fleet.up(amd64=0, arm64=0)
