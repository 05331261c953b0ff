"""Become (sudo) hardening against the fleet's real sudo: what the security review of become
found (runner/internal/execute/become.go; the Go tests cover the give-back's mounts, hard links
and setuid bits, which need privileges the containers do not have).

- sudo is started with a minimal environment: the event's secrets reach the script as root (in
  the spec on sudo's stdin) but are not in sudo's own environment, which sudo may log;
- the script as root gets sudo's PATH (its secure_path) after the helpers, and none of the
  loader or shell start-up variables (``BASH_ENV`` here) that would run code the login side chose;
- sudo SIGKILLed in the middle of a run leaves no root process behind (become-exec's parent-death
  signal stops the script's tree) and nothing root-owned in the login user's home.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from cronium_nb import Event, Fleet, Inventory, Status
from tests.runner_harness import POLL_LIMIT_S, wait_until

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
SUDO_COMMAND = "sudo -S -p [cronium-sudo-password]"  # how the runner's sudo shows in ps (become.go)


@pytest.fixture(scope="module")
def fleet(cronium_fleet_factory) -> Fleet:
    """One amd64 and one arm64 server (full images: sudo), logged into as cronium (passwordless sudo)."""
    return cronium_fleet_factory(amd64=1, arm64=1, user="cronium", name_prefix="becomesec-")


def _inventory(fleet: Fleet, arch: str) -> Inventory:
    return Inventory([replace(fleet.member(f"becomesec-{arch}-1").server, user="cronium")])


def _processes(fleet: Fleet, name: str) -> list[tuple[int, str, str]]:
    """(pid, user, command line) of every process on the server."""
    rows = []
    for line in fleet.exec(name, ["ps", "-eo", "pid=,user:32=,args="]).output.splitlines():
        pid, user, *args = line.split(None, 2)
        rows.append((int(pid), user, args[0] if args else ""))
    return rows


def _sudo_pids(fleet: Fleet, name: str) -> list[int]:
    return [pid for pid, _user, args in _processes(fleet, name) if SUDO_COMMAND in args]


def _sudo_environments(fleet: Fleet, name: str) -> list[str]:
    """The environments of the run's sudo processes, one variable a line. sudo is not dumpable,
    so reading one takes CAP_SYS_PTRACE, which ``docker exec`` lacks: it is read here, on the
    machine that runs the containers (as root), under the process's host PID (``docker top``)."""
    top = fleet.container(name).top(ps_args="-eo pid,args")
    pid_at = top["Titles"].index("PID")
    pids = [int(row[pid_at]) for row in top["Processes"] if SUDO_COMMAND in " ".join(row)]
    return [Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace").replace("\0", "\n") for pid in pids]


@pytest.mark.parametrize("arch", ARCHES)
def test_secrets_stay_out_of_sudos_environment_and_roots_environment_is_sudos(
    fleet: Fleet, executor_factory, arch: str
) -> None:
    name = f"becomesec-{arch}-1"
    token = f"tok-{uuid.uuid4().hex}"
    release = f"/tmp/becomesec-release-{uuid.uuid4().hex[:8]}"
    injected = f"/tmp/becomesec-bash-env-{uuid.uuid4().hex[:8]}"
    fleet.exec(name, f"echo 'echo INJECTED-AS-$(id -un)' > {injected}; chmod 644 {injected}", user="cronium")
    event = Event(
        name="becomesec-env",
        script='echo "uid=$(id -u) token_len=${#DB_TOKEN} bash_env=${BASH_ENV-unset}"; echo "path=$PATH"\n'
        f"sh -c 'until [ -e \"$0\" ]; do sleep 0.2; done' {release}\n"
        'cronium.output "$(id -u)"',
        secrets={"DB_TOKEN": token},
        env={"BASH_ENV": injected},
        timeout=300,
        become=True,
    )
    executor = executor_factory(_inventory(fleet, arch))
    job = executor.submit(event)
    try:
        wait_until("sudo runs the script", lambda: bool(_sudo_pids(fleet, name)), job=job)
        environments = _sudo_environments(fleet, name)
    finally:
        fleet.exec(name, f"touch {release}")
    result = job.result(timeout=POLL_LIMIT_S)
    fleet.exec(name, f"rm -f {release} {injected}")
    assert result.status == Status.SUCCESS, result.summary.to_dict("records")
    assert environments and all("PATH=" in env for env in environments)  # sudo's environment was read
    assert [env for env in environments if token in env or "BASH_ENV" in env] == []
    lines = result.logs["line"].tolist()
    assert f"uid=0 token_len={len(token)} bash_env=unset" in lines  # the secret reached the script, BASH_ENV not
    assert not any("INJECTED" in line for line in lines)
    path = next(line for line in lines if line.startswith("path="))[len("path=") :].split(":")
    assert path[0].endswith("/bin") and "/usr/sbin" in path  # the helpers, then sudo's secure_path
    assert result.outputs[name] == 0  # the helpers work as root


@pytest.mark.parametrize("arch", ARCHES)
def test_sudo_killed_mid_run_leaves_no_root_process(fleet: Fleet, executor_factory, arch: str) -> None:
    name = f"becomesec-{arch}-1"
    marker = f"43{uuid.uuid4().int % 10**6}"
    event = Event(
        name="becomesec-kill-sudo",
        script=f"(trap '' TERM; sleep {marker}) & sleep {marker}",
        timeout=300,
        grace_period=1,
        become=True,
    )
    executor = executor_factory(_inventory(fleet, arch))
    assert executor.run(replace(event, script="true", timeout=120)).status == Status.SUCCESS  # deployed
    job = executor.submit(event)

    def run_processes() -> list[tuple[int, str, str]]:
        return [row for row in _processes(fleet, name) if marker in row[2] or "become-exec" in row[2]]

    wait_until(
        "the script's processes run as root",
        lambda: sum(user == "root" and args.endswith(f"sleep {marker}") for _pid, user, args in run_processes()) == 2,
        job=job,
    )
    sudo = _sudo_pids(fleet, name)
    assert len(sudo) == 1
    fleet.exec(name, f"kill -KILL {sudo[0]}")
    result = job.result(timeout=POLL_LIMIT_S)
    assert result.status != Status.SUCCESS  # its sudo was killed: the run did not succeed
    wait_until("no process of the run is left", lambda: run_processes() == [])
    assert fleet.exec(name, "find /home/cronium -user root").output.strip() == ""
