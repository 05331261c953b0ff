"""Real fleets against real sshd (issue 17): a Host alias of an ssh config, a key only in
ssh-agent, a key protected by a passphrase, servers behind a bastion (inventory ``jump:``,
``ProxyJump``, two hops, a stopped or frozen bastion) and connect retries (a server stopped, then
started during the attempts; a wrong key tried once). The in-process twins of these tests are in
tests/unit/test_real_fleets.py; these prove the same against the Docker fleet's OpenSSH."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncssh
import docker
import pytest

from cronium_nb import Event, Executor, Fleet, Inventory, SSHOptions, Status
from cronium_nb.fleet import FLEET_LABEL
from cronium_nb.model import Server

pytestmark = pytest.mark.fleet
ARCHES = ["amd64", "arm64"]
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
# Where the script ran, as whom, and where its SSH connection came from.
WHERE = Event(
    name="where",
    script='cronium.output user "$(id -un)"; cronium.output machine "$(uname -m)"; '
    'cronium.output ssh "$SSH_CONNECTION"',
    timeout=120,
)


def _options(**changes) -> SSHOptions:
    """No ssh config or agent of the machine's own unless a test says so; short back-offs; a
    runner process per connection (no daemon), so ``$SSH_CONNECTION`` is the run's own
    connection's, not that of whichever connection started a daemon."""
    defaults = {"ssh_config": None, "agent": False, "connect_backoff": (0.2,), "runner_daemon_idle_timeout": 0}
    return SSHOptions(**{**defaults, **changes})


@pytest.fixture
def executor_factory(executor_factory):
    """The shared factory, with this module's SSH options unless a test gives its own."""

    def make(inventory: Inventory, **options) -> Executor:
        options.setdefault("ssh_options", _options())
        return executor_factory(inventory, **options)

    return make


@pytest.fixture(scope="module")
def hidden_fleet(cronium_fleet_factory) -> Fleet:
    """One amd64 and one arm64 server on the fleet's internal network, reached through its bastion."""
    return cronium_fleet_factory(amd64=1, arm64=1, behind_bastion=True, name_prefix="hidden-")


def _config_block(alias: str, *, host: str, port: int, user: str, fleet: Fleet, extra: str = "") -> str:
    return (
        f"Host {alias}\n  HostName {host}\n  Port {port}\n  User {user}\n  IdentityFile {fleet.key_path}\n"
        f"  UserKnownHostsFile {fleet.known_hosts}\n{extra}"
    )


def _ssh_connection(result, name: str) -> tuple[str, str]:
    """(the client's address, the server's address) of a server's ``$SSH_CONNECTION``."""
    client, _client_port, server, port = result.outputs[name]["ssh"].split()
    assert port == "22"
    return client, server


# -- OpenSSH config


@pytest.mark.parametrize("arch", ARCHES)
def test_a_host_alias_reaches_the_server_as_the_configured_user_port_and_key(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    member = cronium_fleet.member(f"{arch}-1").server
    assert member.user == "root" and member.port is not None  # the config below says otherwise
    config = tmp_path / "ssh_config"
    config.write_text(
        _config_block("web-alias", host="127.0.0.1", port=member.port, user="cronium", fleet=cronium_fleet)
        + "Host *\n  User nobody-at-all\n  Port 1\n"  # first obtained value wins, as in OpenSSH
    )
    inventory = Inventory.from_yaml("servers:\n  - {name: web, host: web-alias}\n")
    executor = executor_factory(inventory, ssh_options=_options(ssh_config=config))
    result = executor.run(WHERE, servers="web")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs["web"]["user"] == "cronium"
    assert result.outputs["web"]["machine"] == MACHINE[arch]
    target = executor.pool.resolve(inventory["web"])
    assert target.address == f"cronium@127.0.0.1:{member.port}"
    assert target.key_files == (str(cronium_fleet.key_path),) and target.known_hosts == (
        str(cronium_fleet.known_hosts),
    )
    for name in ("host", "port", "user", "keys", "known_hosts"):
        assert target.origin(name) == "ssh_config", name


# -- ssh-agent and passphrases


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[str]:
    """A running ``ssh-agent`` on a socket of this test's own; yields the socket's path."""
    for tool in ("ssh-agent", "ssh-add"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            pytest.skip(f"no {tool} on this machine (Debian: apt-get install openssh-client)")
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", socket_path], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path):
            assert time.monotonic() < deadline and agent.poll() is None, "ssh-agent did not start"
            time.sleep(0.01)
        yield socket_path
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_key_only_in_ssh_agent_runs_an_event(
    cronium_fleet: Fleet, executor_factory, ssh_agent: str, tmp_path: Path, monkeypatch, arch: str
) -> None:
    env = {**os.environ, "SSH_AUTH_SOCK": ssh_agent}
    subprocess.run(["ssh-add", "-q", str(cronium_fleet.key_path)], env=env, check=True, capture_output=True)
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
    server = replace(cronium_fleet.member(f"{arch}-1").server, key_path=None)
    inventory = Inventory([server])
    executor = executor_factory(inventory, ssh_options=_options(agent=True))
    target = executor.pool.resolve(server)
    assert target.key_files == () and target.agent_path == ssh_agent
    result = executor.run(WHERE, servers=server.name)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs[server.name]["machine"] == MACHINE[arch]
    # the same without the agent: no key at all, refused
    off = executor_factory(inventory, ssh_options=_options(agent=False)).run(WHERE, servers=server.name)
    assert off[server.name].error_kind == "auth" and "tried no key" in off[server.name].error


def test_the_agent_is_forwarded_only_to_a_server_that_asks_for_it(
    hidden_fleet: Fleet, executor_factory, ssh_agent: str, monkeypatch
) -> None:
    """Behind the bastion too: the server with ``forward_agent: true`` sees the agent's key
    (``ssh-add -l`` there), the other has no agent socket at all."""
    env = {**os.environ, "SSH_AUTH_SOCK": ssh_agent}
    subprocess.run(["ssh-add", "-q", str(hidden_fleet.key_path)], env=env, check=True, capture_output=True)
    fingerprint = subprocess.run(["ssh-add", "-l"], env=env, check=True, capture_output=True, text=True).stdout
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent)
    servers = {s.name: s for s in hidden_fleet.inventory}
    servers["hidden-arm64-1"] = replace(servers["hidden-arm64-1"], forward_agent=True)
    executor = executor_factory(Inventory(list(servers.values())), ssh_options=_options(agent=True))
    event = Event(name="agent", script='cronium.output "${SSH_AUTH_SOCK:+$(ssh-add -l)}"', timeout=120)
    result = executor.run(event, servers=hidden_fleet.names)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs["hidden-arm64-1"] == fingerprint.strip()
    assert result.outputs["hidden-amd64-1"] == ""


@pytest.mark.parametrize("arch", ARCHES)
def test_a_passphrase_protected_key_works_with_its_passphrase_and_fails_clearly_without(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, monkeypatch, arch: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO())  # nobody to ask, even under pytest -s
    locked = tmp_path / "id_locked"
    key = asyncssh.read_private_key(str(cronium_fleet.key_path))
    key.write_private_key(str(locked), passphrase="correct horse", rounds=16, ignore_few_rounds=True)
    os.chmod(locked, 0o600)
    server = replace(cronium_fleet.member(f"{arch}-1").server, key_path=str(locked))
    inventory = Inventory([server])
    # before any passphrase was given (the key is unlocked once per process, then kept)
    without = executor_factory(inventory).run(WHERE, servers=server.name)[server.name]
    assert without.status == Status.FAILED and without.error_kind == "auth"
    assert f"key {locked} is protected by a passphrase" in without.error
    assert "SSHOptions(passphrase=" in without.error
    wrong = executor_factory(inventory, ssh_options=_options(passphrase="wrong")).run(WHERE, servers=server.name)
    assert wrong[server.name].error_kind == "auth" and "wrong passphrase" in wrong[server.name].error
    executor = executor_factory(inventory, ssh_options=_options(passphrase="correct horse"))
    result = executor.run(WHERE, servers=server.name)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs[server.name]["machine"] == MACHINE[arch]
    assert "correct horse" not in repr(executor.ssh_options)
    assert "correct horse" not in result.logs.to_string() + result.summary.to_string()


# -- a bastion


def test_the_servers_behind_the_bastion_have_no_other_way_in(hidden_fleet: Fleet) -> None:
    client = docker.from_env()
    assert hidden_fleet.network is not None and hidden_fleet.bastion == "hidden-bastion"
    assert client.networks.get(hidden_fleet.network).attrs["Internal"] is True
    assert hidden_fleet.names == ["hidden-amd64-1", "hidden-arm64-1"]
    for name in hidden_fleet.names:
        attrs = hidden_fleet.container(name).attrs
        assert list(attrs["NetworkSettings"]["Networks"]) == [hidden_fleet.network]
        assert not any(attrs["NetworkSettings"]["Ports"].values())  # nothing published
        server = hidden_fleet.member(name).server
        assert (server.host, server.port, server.jump) == (name, 22, "hidden-bastion")
    bastion = hidden_fleet.member("hidden-bastion").server
    assert bastion.host == "127.0.0.1" and bastion.jump is None
    assert set(hidden_fleet.container("hidden-bastion").attrs["NetworkSettings"]["Networks"]) == {
        hidden_fleet.network,
        f"cronium-{hidden_fleet.fleet_id}-edge",
    }
    inventory = hidden_fleet.inventory
    assert [s.name for s in inventory] == ["hidden-bastion", *hidden_fleet.names]
    assert list(inventory.groups["fleet"]) == hidden_fleet.names
    lines = hidden_fleet.known_hosts.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted([f"[127.0.0.1]:{bastion.port}", *hidden_fleet.names])
    # docker exec needs no network
    assert hidden_fleet.exec("hidden-arm64-1", "uname -m").output.strip() == "aarch64"


def _fleet_networks(fleet_id: str) -> list[str]:
    return sorted(n.name for n in docker.from_env().networks.list(filters={"label": f"{FLEET_LABEL}={fleet_id}"}))


CRASHING_OWNER = """
import time
from cronium_nb import Fleet
fleet = Fleet.up(amd64=1, arm64=0, variant="bare", behind_bastion=True, name_prefix="crash-")
print(fleet.fleet_id, flush=True)
time.sleep(600)
"""


def test_down_and_cleanup_stale_remove_the_fleet_networks() -> None:
    fleet = Fleet.up(amd64=1, arm64=0, variant="bare", behind_bastion=True)
    assert _fleet_networks(fleet.fleet_id) == [f"cronium-{fleet.fleet_id}-edge", f"cronium-{fleet.fleet_id}-internal"]
    fleet.down()
    assert _fleet_networks(fleet.fleet_id) == []
    assert docker.from_env().containers.list(all=True, filters={"label": f"{FLEET_LABEL}={fleet.fleet_id}"}) == []
    # a fleet whose process was killed: its networks go with its containers
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        fleet_id = owner.stdout.readline().strip()
        assert len(_fleet_networks(fleet_id)) == 2
        Fleet.cleanup_stale()  # its owner lives: kept
        assert len(_fleet_networks(fleet_id)) == 2
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    Fleet.cleanup_stale()  # another test process may have run it first: no count is asserted
    assert _fleet_networks(fleet_id) == []


@pytest.mark.parametrize("arch", ARCHES)
def test_a_server_behind_the_bastion_runs_and_sees_the_bastion_connect(
    hidden_fleet: Fleet, executor_factory, arch: str
) -> None:
    name = f"hidden-{arch}-1"
    executor = executor_factory(hidden_fleet.inventory)
    result = executor.run(WHERE, servers=name)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs[name]["machine"] == MACHINE[arch]
    assert _ssh_connection(result, name) == (
        hidden_fleet.internal_address("hidden-bastion"),
        hidden_fleet.internal_address(name),
    )
    assert [hop.name for hop in executor.pool.resolve(hidden_fleet.inventory[name]).chain] == ["hidden-bastion"]


def test_both_servers_share_one_bastion_connection(hidden_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(hidden_fleet.inventory)
    result = executor.run(WHERE, servers="fleet")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    bastion = hidden_fleet.internal_address("hidden-bastion")
    assert {_ssh_connection(result, name)[0] for name in hidden_fleet.names} == {bastion}
    assert executor.pool.connects == 3  # the bastion once, and each server
    # the bastion itself is a server too, over the same pooled connection
    assert executor.run(WHERE, servers="hidden-bastion").status == Status.SUCCESS
    assert executor.pool.connects == 3


@pytest.mark.parametrize("arch", ARCHES)
def test_proxy_jump_in_the_ssh_config_goes_through_the_bastion(
    hidden_fleet: Fleet, executor_factory, tmp_path: Path, arch: str
) -> None:
    """Nothing but name and host in the inventory: the alias, its HostName and its ProxyJump
    (a host of the config, not of the inventory) come from the ssh config."""
    name = f"hidden-{arch}-1"
    bastion = hidden_fleet.member("hidden-bastion").server
    assert bastion.port is not None
    config = tmp_path / "ssh_config"
    config.write_text(
        _config_block("app", host=name, port=22, user="root", fleet=hidden_fleet, extra="  ProxyJump gateway\n")
        + _config_block("gateway", host="127.0.0.1", port=bastion.port, user="root", fleet=hidden_fleet)
    )
    inventory = Inventory.from_yaml("servers:\n  - {name: app, host: app}\n")
    executor = executor_factory(inventory, ssh_options=_options(ssh_config=config))
    target = executor.pool.resolve(inventory["app"])
    assert [hop.name for hop in target.chain] == ["gateway"] and target.origin("jump") == "ssh_config"
    result = executor.run(WHERE, servers="app")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs["app"]["machine"] == MACHINE[arch]
    assert _ssh_connection(result, "app")[0] == hidden_fleet.internal_address("hidden-bastion")


def test_a_two_hop_chain(hidden_fleet: Fleet, executor_factory, tmp_path: Path) -> None:
    """bastion -> hidden-amd64-1 -> hidden-arm64-1, written as the inventory's ``jump:`` chain and
    as ``ProxyJump gateway,hidden-amd64-1`` in the ssh config: the target sees the middle hop."""
    bastion = hidden_fleet.member("hidden-bastion").server
    assert bastion.port is not None
    deep = replace(hidden_fleet.member("hidden-arm64-1").server, name="deep", jump="hidden-amd64-1")
    config = tmp_path / "ssh_config"
    config.write_text(
        _config_block("gateway", host="127.0.0.1", port=bastion.port, user="root", fleet=hidden_fleet)
        + "Host deep-via-config\n  HostName hidden-arm64-1\n  ProxyJump gateway,hidden-amd64-1\n"
        + f"Host hidden-* deep-via-config\n  User root\n  IdentityFile {hidden_fleet.key_path}\n"
        + f"  UserKnownHostsFile {hidden_fleet.known_hosts}\n"
    )
    inventory = Inventory([*hidden_fleet.inventory, deep, Server(name="deep-config", host="deep-via-config")])
    executor = executor_factory(inventory, ssh_options=_options(ssh_config=config))
    assert [hop.name for hop in executor.pool.resolve(inventory["deep"]).chain] == ["hidden-bastion", "hidden-amd64-1"]
    assert [hop.name for hop in executor.pool.resolve(inventory["deep-config"]).chain] == [
        "gateway",
        "hidden-amd64-1",
    ]
    result = executor.run(WHERE, servers="deep,deep-config")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    middle, target = hidden_fleet.internal_address("hidden-amd64-1"), hidden_fleet.internal_address("hidden-arm64-1")
    for name in ("deep", "deep-config"):
        assert result.outputs[name]["machine"] == "aarch64"
        assert _ssh_connection(result, name) == (middle, target)


@pytest.mark.parametrize("how", ["stopped", "paused"])
def test_a_dead_bastion_fails_only_its_servers_within_the_connect_timeout(
    hidden_fleet: Fleet, cronium_fleet: Fleet, executor_factory, how: str
) -> None:
    """Stopped: its port refuses (tried again, briefly); paused (frozen): the TCP connection
    opens but no SSH banner comes, until ConnectTimeout (not tried again). Either way every
    server behind it fails, naming it, and a server not behind it runs."""
    connect_timeout = 5.0
    inventory = hidden_fleet.inventory.merged(cronium_fleet.inventory)
    executor = executor_factory(
        inventory, ssh_options=_options(connect_timeout=connect_timeout, connect_attempts=3, connect_backoff=(0.3,))
    )
    lever, restore = (
        (hidden_fleet.stop, hidden_fleet.start) if how == "stopped" else (hidden_fleet.pause, hidden_fleet.unpause)
    )
    lever("hidden-bastion")
    try:
        started = time.monotonic()
        result = executor.run(WHERE, servers=[*hidden_fleet.names, "amd64-1"])
        elapsed = time.monotonic() - started
    finally:
        restore("hidden-bastion")
    assert result.status == Status.PARTIAL, result.summary.to_string()
    assert result["amd64-1"].status == Status.SUCCESS
    for name in hidden_fleet.names:
        error = result[name].error
        assert result[name].error_kind == "unreachable", error
        assert error.startswith("jump host hidden-bastion failed: cannot reach root@127.0.0.1:"), error
        if how == "stopped":
            assert "Connection refused (3 attempts;" in error, error
        else:
            assert f"no answer within {connect_timeout:g} s (ConnectTimeout)" in error, error
    # one round of attempts for both servers; the direct server's own run (deploy included) ends first
    assert elapsed < connect_timeout + 5, elapsed
    # and the bastion back, its servers run again
    again = executor.run(WHERE, servers=hidden_fleet.names)
    assert again.status == Status.SUCCESS, again.summary.to_string()


def test_a_server_the_bastion_cannot_reach_fails_alone_with_the_bastions_reason(
    hidden_fleet: Fleet, executor_factory
) -> None:
    executor = executor_factory(hidden_fleet.inventory, ssh_options=_options(connect_attempts=2))
    hidden_fleet.stop("hidden-amd64-1")
    try:
        result = executor.run(WHERE, servers="fleet")
    finally:
        hidden_fleet.start("hidden-amd64-1")
    assert result.status == Status.PARTIAL, result.summary.to_string()
    assert result["hidden-arm64-1"].status == Status.SUCCESS
    failed = result["hidden-amd64-1"]
    assert failed.error_kind == "unreachable", failed.error
    assert failed.error.startswith(
        "cannot reach root@hidden-amd64-1:22 (through jump host hidden-bastion): the jump host said: "
    ), failed.error
    assert "(2 attempts;" in failed.error  # the bastion's refusal to open the channel is tried again


def test_after_the_bastion_restarts_the_next_run_reconnects_through_it(hidden_fleet: Fleet, executor_factory) -> None:
    """The pooled bastion connection and the servers' connections through it die with the
    bastion's sshd; the pool notices and the next run opens new ones."""
    executor = executor_factory(hidden_fleet.inventory)
    assert executor.run(WHERE, servers="fleet").status == Status.SUCCESS
    hidden_fleet.restart("hidden-bastion")
    result = executor.run(WHERE, servers="fleet")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    bastion = hidden_fleet.internal_address("hidden-bastion")
    assert {_ssh_connection(result, name)[0] for name in hidden_fleet.names} == {bastion}
    assert executor.pool.connects == 6


def test_the_fleet_magic_starts_a_fleet_behind_a_bastion(tmp_path: Path, monkeypatch) -> None:
    from cronium_nb.notebook.magics import CroniumMagics

    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))
    magics = CroniumMagics(shell=None)
    try:
        frame = magics.cronium_fleet("up --amd64 1 --arm64 0 --variant bare --behind-bastion").set_index("name")
        assert list(frame.index) == ["bastion", "amd64-1"]
        assert (frame.loc["amd64-1", "host"], frame.loc["amd64-1", "jump"]) == ("amd64-1", "bastion")
        resolved = magics.cronium_servers("").set_index("name")
        assert resolved.loc["amd64-1", "jump"] == "bastion"
    finally:
        magics.session.close()


# -- connect retries


@pytest.fixture(scope="module")
def retry_fleet(cronium_fleet_factory) -> Fleet:
    return cronium_fleet_factory(amd64=1, arm64=1, name_prefix="retry-")


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_server_started_during_the_connect_attempts_is_reached(
    retry_fleet: Fleet, executor_factory, arch: str
) -> None:
    """The container is stopped (its port refuses); the run's connect attempts are refused at
    least twice, then the container starts and the next attempt gets in."""
    name = f"retry-{arch}-1"
    retry_fleet.stop(name)
    try:
        executor = executor_factory(
            retry_fleet.inventory, ssh_options=_options(connect_attempts=200, connect_backoff=(0.3,))
        )
        job = executor.submit(WHERE, servers=name)
        _wait_until(lambda: executor.pool.connect_retries >= 2, 30, "two attempts were refused")
        assert not job.done()
    finally:
        retry_fleet.start(name)  # waits for sshd's banner
    result = job.result(120)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result.outputs[name]["machine"] == MACHINE[arch]
    assert executor.pool.connect_retries >= 2 and executor.pool.connects == 1


@pytest.mark.parametrize("arch", ARCHES)
def test_a_wrong_key_is_tried_once(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path, monkeypatch, arch: str
) -> None:
    stranger = tmp_path / "id_stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    server = replace(cronium_fleet.member(f"{arch}-1").server, key_path=str(stranger))
    attempts: list[str] = []
    real_connect = asyncssh.connect

    async def counting_connect(host, *args, **kwargs):
        attempts.append(host)
        return await real_connect(host, *args, **kwargs)

    monkeypatch.setattr(asyncssh, "connect", counting_connect)
    executor = executor_factory(Inventory([server]), ssh_options=_options(connect_attempts=5))
    result = executor.run(WHERE, servers=server.name)
    assert result[server.name].error_kind == "auth", result.summary.to_string()
    assert "refused our key" in result[server.name].error and str(stranger) in result[server.name].error
    assert attempts == ["127.0.0.1"] and executor.pool.connect_retries == 0
