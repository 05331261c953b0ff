"""Become (sudo) against the fleet's real sudo (issue 17): the fleet's users are ``cronium``
(passwordless sudo), ``operator`` (sudo with FIXTURE_SUDO_PASSWORD) and ``intruder`` (no sudo
rights). The script runs as root, its helpers work, nothing of the run stays root's in the
login user's home; the password reaches sudo and nothing else (the store's bytes, logs, results,
errors, ``ps`` on the server while the script runs); a user who may not sudo fails alone; a
timeout or a cancel leaves no process, the root-owned ones included."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cronium_nb import Event, Fleet, Inventory, Status
from cronium_nb.fleet import FIXTURE_SUDO_PASSWORD
from tests.kernel_harness import kernel, run_cell_answering
from tests.runner_harness import POLL_LIMIT_S, wait_until

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
PASSWORD = FIXTURE_SUDO_PASSWORD


@pytest.fixture(scope="module")
def fleet(cronium_fleet_factory) -> Fleet:
    """One amd64 and one arm64 server (full images: sudo), logged into as cronium by default."""
    return cronium_fleet_factory(amd64=1, arm64=1, user="cronium", name_prefix="become-")


def _as(fleet: Fleet, users: dict[str, str]) -> Inventory:
    """The fleet's servers (by arch) logged into as the given users."""
    return Inventory([replace(fleet.member(f"become-{arch}-1").server, user=user) for arch, user in users.items()])


def _processes(fleet: Fleet, name: str) -> list[tuple[str, str]]:
    """(user, command line) of every process on the server (under emulation a command line starts
    with qemu's: match its end)."""
    lines = fleet.exec(name, ["ps", "-eo", "user:32,args", "--no-headers"]).output.splitlines()
    return [(parts[0], parts[1] if len(parts) > 1 else "") for parts in (line.split(None, 1) for line in lines)]


def _left_to_root(fleet: Fleet, name: str, user: str) -> str:
    """Whatever under the login user's home belongs to root (nothing should)."""
    return fleet.exec(name, f"find /home/{user} -user root").output.strip()


@pytest.mark.parametrize("arch", ARCHES)
def test_become_runs_as_root_with_working_helpers_and_gives_everything_back(
    fleet: Fleet, executor_factory, arch: str
) -> None:
    name = f"become-{arch}-1"
    bash = Event(
        name="become-bash",
        script='id -u; echo "home=$HOME user=$USER sudo_user=$SUDO_USER"\n'
        'cronium.output uid "$(id -u)"; cronium.output n "$(cronium.input n)"\n'
        'cronium.setVariable became "$(id -un)"; mkdir made && touch made/by-root output-extra',
        input={"n": 7},
        timeout=120,
        become=True,
    )
    python = Event(
        name="become-python",
        script="import os\ncronium.output({'uid': os.getuid(), 'n': cronium.input('n')})\n"
        "cronium.setVariable('py', cronium.getVariable('became'))",
        type="python",
        input={"n": 8},
        timeout=120,
        become=True,
    )
    executor = executor_factory(_as(fleet, {arch: "cronium"}))
    first = executor.run(bash)
    assert first.status == Status.SUCCESS, first.summary.to_dict("records")
    lines = first.logs["line"].tolist()
    assert lines[0] == "0" and "home=/root user=root sudo_user=cronium" in lines
    assert first.outputs[name] == {"uid": 0, "n": 7}
    assert first.variables[name] == {"became": "root"}
    second = executor.run(python)  # same runner session and helper dir; python imports the helpers
    assert second.status == Status.SUCCESS, second.summary.to_dict("records")
    assert second.outputs[name] == {"uid": 0, "n": 8} and second.variables[name]["py"] == "root"
    api = executor.run(bash, api=True)  # the helpers through the orchestrator's API socket, as root
    assert api.status == Status.SUCCESS and api[name].helpers == "api", api.summary.to_dict("records")
    assert api.outputs[name] == {"uid": 0, "n": 7} and api.variables[name]["became"] == "root"
    assert _left_to_root(fleet, name, "cronium") == ""
    plain = executor.run(replace(bash, name="plain", become=False))  # the server's login user again
    assert plain.status == Status.SUCCESS and plain.outputs[name]["uid"] == 1000


@pytest.mark.parametrize("arch", ARCHES)
def test_a_servers_become_default_in_the_inventory(fleet: Fleet, executor_factory, arch: str) -> None:
    server = replace(fleet.member(f"become-{arch}-1").server, become=True)
    result = executor_factory(Inventory([server])).run(Event(name="uid", script="id -u", timeout=120))
    assert result.status == Status.SUCCESS and result.logs["line"].tolist() == ["0"]


@pytest.mark.parametrize("arch", ARCHES)
def test_sudo_with_a_password_works_and_the_password_is_found_nowhere(
    fleet: Fleet, executor_factory, arch: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"become-{arch}-1"
    release = f"/tmp/become-release-{uuid.uuid4().hex[:8]}"
    event = Event(
        name="become-operator",
        # The script waits for the test to have looked at the server's processes.
        script=f'echo "running as $(id -un)"; sh -c \'until [ -e "$0" ]; do sleep 0.2; done\' {release}\n'
        'cronium.output "$(id -u)"',
        timeout=300,
        become=True,
    )
    caplog.set_level(logging.DEBUG)
    executor = executor_factory(_as(fleet, {arch: "operator"}), become_password=PASSWORD)
    job = executor.submit(event)
    samples: list[list[tuple[str, str]]] = []

    def script_running() -> bool:
        samples.append(_processes(fleet, name))
        return any(user == "root" and args.endswith(f"done {release}") for user, args in samples[-1])

    try:
        wait_until("the script runs as root", script_running, job=job)
        for _ in range(3):  # and a few more looks while it runs
            samples.append(_processes(fleet, name))
    finally:
        fleet.exec(name, f"touch {release}")
    result = job.result(timeout=POLL_LIMIT_S)
    fleet.exec(name, f"rm -f {release}")
    assert result.status == Status.SUCCESS, result.summary.to_dict("records")
    assert result.outputs[name] == 0 and "running as root" in result.logs["line"].tolist()
    seen_args = [args for sample in samples for _user, args in sample]
    assert any(args.endswith(" become-exec") for args in seen_args)  # the samples saw the run's processes
    assert [args for args in seen_args if PASSWORD in args] == []
    executor.close()  # the store written and closed
    seen = {
        "logs": result.logs.to_csv(),
        "summary": result.summary.to_csv(),
        "history": str(result.outputs) + str(result.variables),
        "python logs": caplog.text,
        "server home": fleet.exec(name, f"grep -r -l -e {PASSWORD} /home/operator || true").output,
    }
    seen.update({path.name: path.read_bytes().decode("latin-1") for path in (tmp_path / "state0").glob("cronium.db*")})
    assert len(seen) > 5  # the store's files were read
    assert [where for where, text in seen.items() if PASSWORD in text] == []
    assert _left_to_root(fleet, name, "operator") == ""


@pytest.mark.parametrize("arch", ARCHES)
def test_a_user_who_may_not_sudo_fails_alone_with_sudos_reason(fleet: Fleet, executor_factory, arch: str) -> None:
    other = "arm64" if arch == "amd64" else "amd64"
    executor = executor_factory(_as(fleet, {arch: "intruder", other: "cronium"}), become_password=PASSWORD)
    result = executor.run(Event(name="become-intruder", script="id -u", timeout=120, become=True))
    assert result.status == Status.PARTIAL
    refused, fine = result[f"become-{arch}-1"], result[f"become-{other}-1"]
    assert refused.status == Status.FAILED and refused.error_kind == "become"
    assert refused.error == "become: sudo refused to run as root: intruder is not in the sudoers file."
    assert fine.status == Status.SUCCESS and result.logs.query("server == @fine.server")["line"].tolist() == ["0"]
    assert result.logs.query("server == @refused.server").empty  # sudo's words are the error, not output


def test_without_the_password_sudo_that_asks_fails_clearly_and_the_password_is_asked_once(
    fleet: Fleet, executor_factory
) -> None:
    nobody_asked = executor_factory(_as(fleet, {"amd64": "operator", "arm64": "cronium"}))
    result = nobody_asked.run(Event(name="become-no-password", script="id -u", timeout=120, become=True))
    assert result.status == Status.PARTIAL  # cronium's sudo needs no password
    refused = result["become-amd64-1"]
    assert refused.error_kind == "become" and "needs a password to run as root, and none could be had" in refused.error
    wrong = executor_factory(_as(fleet, {"amd64": "operator"}), become_password="not-the-password")
    refused = wrong.run(Event(name="become-wrong", script="id -u", timeout=120, become=True))["become-amd64-1"]
    assert refused.error_kind == "become" and "sudo did not accept the password to run as root" in refused.error
    assert "not-the-password" not in refused.error
    asked: list[int] = []
    executor = executor_factory(
        _as(fleet, {"amd64": "operator", "arm64": "cronium"}), become_password=lambda: asked.append(1) or PASSWORD
    )
    event = Event(name="become-asked", script="id -u", timeout=120, become=True)
    assert executor.run(event, servers=["become-arm64-1"]).status == Status.SUCCESS
    assert asked == []  # passwordless sudo: nobody is asked
    for _ in range(2):
        assert executor.run(event).status == Status.SUCCESS
    assert asked == [1]


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.parametrize("arch", ARCHES)
def test_a_stopped_become_run_leaves_no_process(fleet: Fleet, executor_factory, arch: str, how: str) -> None:
    name = f"become-{arch}-1"
    marker = f"42{uuid.uuid4().int % 10**6}"
    event = Event(
        name="become-stop",
        # root's processes: one that ignores SIGTERM, one escaped into its own session, the script
        script=f"(trap '' TERM; sleep {marker}) & setsid sleep {marker} & sleep {marker}",
        timeout=15 if how == "timeout" else 300,
        grace_period=1,
        become=True,
    )
    executor = executor_factory(_as(fleet, {arch: "cronium"}))
    # Deployed and sudo checked first: the short timeout is the script's alone (emulated arm64
    # takes seconds to deploy and to start sudo).
    assert executor.run(replace(event, script="true", timeout=120)).status == Status.SUCCESS
    job = executor.submit(event)

    def run_processes() -> list[tuple[str, str]]:  # the script's, become-exec and sudo (its args name it)
        return [(user, args) for user, args in _processes(fleet, name) if marker in args or "become-exec" in args]

    def three_sleeping() -> bool:
        return sum(user == "root" and args.endswith(f"sleep {marker}") for user, args in run_processes()) == 3

    wait_until("the script's processes run as root", three_sleeping, job=job)
    if how == "cancel":
        job.cancel()
    result = job.result(timeout=POLL_LIMIT_S)
    assert result.status == (Status.TIMEOUT if how == "timeout" else Status.CANCELLED)
    wait_until("no process of the run is left", lambda: run_processes() == [], limit=30)
    assert _left_to_root(fleet, name, "cronium") == ""


def test_a_notebook_asks_for_the_sudo_password_once(fleet: Fleet, tmp_path: Path) -> None:
    """``%%cronium --become`` in a real kernel, both servers' sudo asking: the frontend's password
    field (an input request) comes once, and the password is not in the cell's output."""
    servers = [
        {"name": s.name, "host": s.host, "port": s.port, "user": "operator", "key_path": s.key_path,
         "known_hosts": s.known_hosts}
        for s in fleet.servers
    ]  # fmt: skip
    inventory = tmp_path / "servers.yaml"
    inventory.write_text(yaml.safe_dump({"servers": servers}))
    with kernel({"CRONIUM_HOME": str(tmp_path / "home"), "CRONIUM_DISPLAY": "text"}) as client:
        client.execute(f"%load_ext cronium_nb\n%cronium_servers {inventory}", reply=True, timeout=60)
        cell = run_cell_answering(client, "%%cronium -s all --become -o res\necho uid $(id -u)", PASSWORD, POLL_LIMIT_S)
        assert cell.reply["status"] == "ok", cell.reply
        assert cell.prompts == [("sudo password for operator@127.0.0.1 (to run as root): ", True)]  # once for both
        assert cell.text.count("uid 0") == 2 and PASSWORD not in cell.text, cell.text
        check = client.execute("assert res.status == 'success', res.summary", reply=True, timeout=30)
        assert check["content"]["status"] == "ok", check["content"]
