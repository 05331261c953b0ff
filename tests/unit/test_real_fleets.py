"""Real fleets against in-process SSH servers (issue 17): a Host alias of an ssh config, jump hosts
(inventory ``jump:`` and ``ProxyJump``, two hops, a dead one), ssh-agent keys, a key protected by
a passphrase, and connect retries (refused twice then accepted; a wrong key tried once)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from cronium_nb import Event, Inventory, SSHOptions, Status

ECHO = Event(name="hello", script="echo up", timeout=30)


def _options(**changes) -> SSHOptions:
    return SSHOptions(**{"ssh_config": None, "connect_backoff": (0.05,), **changes})


def _came_through(bastion, target) -> bool:
    """The target saw a connection from the local port the bastion's forward used."""
    forwarded = {from_port for host, port, from_port in bastion.forwarded if port == target.port}
    return bool(forwarded) and any(port in forwarded for _address, port in target.peers)


def test_a_host_alias_of_the_ssh_config_is_all_the_inventory_needs(local_servers, local_executor, tmp_path) -> None:
    fleet = local_servers(1)
    member = fleet["srv-1"]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host web-alias\n  HostName 127.0.0.1\n  Port {member.port}\n  User {member.user}\n"
        f"  IdentityFile {fleet.hub.key_path}\n  UserKnownHostsFile {fleet.known_hosts}\n  ConnectTimeout 5\n"
    )
    inventory = Inventory.from_yaml("servers:\n  - {name: web, host: web-alias}\n")
    executor = local_executor(inventory, ssh_options=_options(ssh_config=config))
    result = executor.run(ECHO, servers="web")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    target = executor.pool.resolve(inventory["web"])
    assert target.address == f"{member.user}@127.0.0.1:{member.port}" and target.origin("port") == "ssh_config"


def test_a_server_behind_a_jump_host_shares_its_pooled_connection(local_servers, local_executor) -> None:
    fleet = local_servers(3)
    bastion, first, second = fleet["srv-1"], fleet["srv-2"], fleet["srv-3"]
    inventory = Inventory(
        [
            fleet.server("srv-1", name="bastion"),
            fleet.server("srv-2", name="app-1", jump="bastion"),
            fleet.server("srv-3", name="app-2", jump="bastion"),
        ]
    )
    executor = local_executor(inventory, ssh_options=_options())
    result = executor.run(ECHO, servers="app-1,app-2")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert _came_through(bastion, first) and _came_through(bastion, second)
    assert bastion.connections_made == 1  # one bastion connection, shared by both
    assert {port for _host, port, _from in bastion.forwarded} == {first.port, second.port}
    # the bastion itself can be a target too, over the same pooled connection
    assert executor.run(ECHO, servers="bastion").status == Status.SUCCESS
    assert bastion.connections_made == 1


def test_proxy_jump_from_the_ssh_config_and_a_two_hop_chain(local_servers, local_executor, tmp_path) -> None:
    fleet = local_servers(3)
    outer, inner, app = fleet["srv-1"], fleet["srv-2"], fleet["srv-3"]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host behind\n  HostName 127.0.0.1\n  Port {app.port}\n  ProxyJump edge\n")
    inventory = Inventory(
        [
            fleet.server("srv-1", name="edge"),
            fleet.server("srv-2", name="middle", jump="edge"),
            fleet.server("srv-3", name="deep", jump="middle"),
            fleet.server("srv-3", name="via-config", host="behind", port=None),
        ]
    )
    executor = local_executor(inventory, ssh_options=_options(ssh_config=config))
    deep = executor.run(ECHO, servers="deep")
    assert deep.status == Status.SUCCESS, deep.summary.to_string()
    assert _came_through(outer, inner) and _came_through(inner, app)
    via = executor.run(ECHO, servers="via-config")
    assert via.status == Status.SUCCESS, via.summary.to_string()
    target = executor.pool.resolve(inventory["via-config"])
    assert [hop.name for hop in target.chain] == ["edge"] and target.origin("jump") == "ssh_config"
    assert _came_through(outer, app)


def test_a_dead_jump_host_fails_only_its_servers_naming_it(local_servers, local_executor) -> None:
    fleet = local_servers(3)
    inventory = Inventory(
        [
            fleet.server("srv-1", name="bastion"),
            fleet.server("srv-2", name="behind", jump="bastion"),
            fleet.server("srv-3", name="behind-too", jump="bastion"),
            fleet.server("srv-3", name="direct"),
        ]
    )
    fleet["srv-1"].stop_listening()
    executor = local_executor(inventory, ssh_options=_options(connect_attempts=2, connect_backoff=(0.3,)))
    result = executor.run(ECHO, servers="behind,behind-too,direct")
    assert result.status == Status.PARTIAL, result.summary.to_string()
    assert result["direct"].status == Status.SUCCESS
    for name in ("behind", "behind-too"):
        assert result[name].error_kind == "unreachable"
        assert result[name].error.startswith("jump host bastion failed: cannot reach"), result[name].error
        assert "refused" in result[name].error.lower()
    assert executor.pool.connect_retries == 1  # one round of attempts, shared by both servers behind it
    # a target the jump host cannot reach: the jump host's refusal, named
    fleet["srv-1"].listen()
    fleet["srv-2"].stop_listening()
    again = executor.run(ECHO, servers="behind")
    assert again["behind"].error_kind == "unreachable"
    assert "through jump host bastion" in again["behind"].error and "refused" in again["behind"].error.lower()


def test_a_refused_connection_is_retried_until_the_server_listens(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    member = fleet["srv-1"]
    member.stop_listening()
    executor = local_executor(fleet.inventory, ssh_options=_options(connect_backoff=(0.5,), connect_attempts=5))
    job = executor.submit(ECHO, servers="srv-1")
    deadline = time.monotonic() + 20
    while executor.pool.connect_retries < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    member.listen()  # during the back-off after the second refusal
    result = job.result(30)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert executor.pool.connect_retries == 2 and executor.pool.connects == 1
    assert member.connections_made == 1


def test_retries_stop_at_the_attempt_limit_and_the_deadline(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    fleet["srv-1"].stop_listening()
    executor = local_executor(fleet.inventory, ssh_options=_options(connect_backoff=(0.05,), connect_attempts=3))
    result = executor.run(ECHO, servers="srv-1")
    assert result["srv-1"].error_kind == "unreachable" and "(3 attempts;" in result["srv-1"].error
    assert executor.pool.connect_retries == 2
    # a back-off that would pass the event's timeout is not waited for: the refusal is the error
    slow = local_executor(fleet.inventory, ssh_options=_options(connect_backoff=(60.0,), connect_attempts=5))
    started = time.monotonic()
    quick = slow.run(Event(name="quick", script="true", timeout=2, grace_period=1), servers="srv-1")
    assert time.monotonic() - started < 10
    assert quick["srv-1"].error_kind == "unreachable" and "refused" in quick["srv-1"].error.lower()


def test_a_wrong_key_or_host_key_is_not_retried(local_servers, local_executor, tmp_path) -> None:
    fleet = local_servers(1)
    member = fleet["srv-1"]
    stranger = tmp_path / "id_stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    wrong_known_hosts = tmp_path / "wrong_known_hosts"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    wrong_known_hosts.write_text(f"[127.0.0.1]:{member.port} {other}")
    inventory = Inventory(
        [
            fleet.server("srv-1", name="stranger", key_path=str(stranger)),
            fleet.server("srv-1", name="impostor", known_hosts=str(wrong_known_hosts)),
        ]
    )
    executor = local_executor(inventory, ssh_options=_options(connect_attempts=5))
    result = executor.run(ECHO, servers="all")
    assert result["stranger"].error_kind == "auth" and "refused our key" in result["stranger"].error
    assert str(stranger) in result["stranger"].error  # says which key was tried
    assert result["impostor"].error_kind == "host_key"
    assert executor.pool.connect_retries == 0 and member.connections_made == 2  # one attempt each


@pytest.mark.filterwarnings("ignore:.*bcrypt.kdf")  # few KDF rounds: a fast test
def test_a_passphrase_protected_key_is_unlocked_once(local_servers, local_executor, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal to ask in, even under pytest -s
    fleet = local_servers(2)
    locked = tmp_path / "id_locked"
    fleet.hub.client_key.write_private_key(str(locked), passphrase="correct horse", rounds=4)
    os.chmod(locked, 0o600)
    inventory = Inventory([fleet.server(name, key_path=str(locked)) for name in fleet.names])
    asked: list[str] = []

    def prompt(path: str) -> str:
        asked.append(path)
        return "correct horse"

    # without a passphrase and nobody to ask (no terminal here): a clear auth failure
    plain = local_executor(inventory, ssh_options=_options())
    failed = plain.run(ECHO, servers="srv-1")
    assert failed["srv-1"].error_kind == "auth"
    assert "protected by a passphrase" in failed["srv-1"].error and "SSHOptions(passphrase=" in failed["srv-1"].error
    wrong = local_executor(inventory, ssh_options=_options(passphrase="wrong")).run(ECHO, servers="srv-1")
    assert wrong["srv-1"].error_kind == "auth" and "wrong passphrase" in wrong["srv-1"].error
    executor = local_executor(inventory, ssh_options=_options(passphrase=prompt))
    result = executor.run(ECHO, servers="all")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert asked == [str(locked)]  # once for both servers
    assert "correct horse" not in repr(executor.ssh_options)
    # the unlocked key is kept for the process: a new executor does not ask again
    again = local_executor(inventory, ssh_options=_options(passphrase=prompt)).run(ECHO, servers="srv-1")
    assert again.status == Status.SUCCESS and asked == [str(locked)]


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("no ssh-agent/ssh-add on this machine (apt-get install openssh-client)")
    socket_path = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", socket_path], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield {**os.environ, "SSH_AUTH_SOCK": socket_path}
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


def test_keys_in_ssh_agent_are_used_unless_turned_off(
    local_servers, local_executor, ssh_agent, tmp_path, monkeypatch
) -> None:
    fleet = local_servers(1)
    subprocess.run(["ssh-add", "-q", str(fleet.hub.key_path)], env=ssh_agent, check=True, capture_output=True)
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent["SSH_AUTH_SOCK"])
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
    inventory = Inventory([fleet.server("srv-1", key_path=None)])
    result = local_executor(inventory, ssh_options=_options()).run(ECHO, servers="srv-1")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    off = local_executor(inventory, ssh_options=_options(agent=False)).run(ECHO, servers="srv-1")
    assert off["srv-1"].error_kind == "auth" and "tried no key" in off["srv-1"].error


def test_agent_forwarding_only_where_asked(local_servers, local_executor, ssh_agent, monkeypatch) -> None:
    fleet = local_servers(1)
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent["SSH_AUTH_SOCK"])
    inventory = Inventory([fleet.server("srv-1"), fleet.server("srv-1", name="forwarding", forward_agent=True)])
    executor = local_executor(inventory, ssh_options=_options())
    assert executor.pool.resolve(inventory["srv-1"]).forward_agent is False
    assert executor.pool.resolve(inventory["forwarding"]).forward_agent is True
    assert executor.pool.resolve(inventory["srv-1"]).key != executor.pool.resolve(inventory["forwarding"]).key


def test_a_connection_reset_while_connecting_is_retried(local_executor, tmp_path) -> None:
    """A listener that resets every connection before the SSH banner (as sshd past MaxStartups)."""
    import socket
    import struct
    import threading

    from cronium_nb import Server

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port, accepted = listener.getsockname()[1], []

    def reset_all() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST

    threading.Thread(target=reset_all, daemon=True).start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    server = Server(name="flaky", host="127.0.0.1", port=port, user="u", known_hosts=str(known_hosts))
    executor = local_executor(Inventory([server]), ssh_options=_options(connect_attempts=3))
    try:
        result = executor.run(ECHO, servers="flaky")
    finally:
        listener.close()
    error = result["flaky"].error
    assert result["flaky"].error_kind == "unreachable" and "(3 attempts;" in error, error
    assert len(accepted) == 3 and executor.pool.connect_retries == 2


@pytest.mark.filterwarnings("ignore:.*bcrypt.kdf")
def test_a_locked_key_of_the_ssh_config_is_passed_over_for_the_agent(
    local_servers, local_executor, ssh_agent, tmp_path, monkeypatch
) -> None:
    """As ssh: a key named by the config that nobody can unlock is passed over, and the agent's
    keys still work; without them the error says which key was passed over and why."""
    monkeypatch.setattr("sys.stdin", io.StringIO())
    fleet = local_servers(1)
    locked = tmp_path / "id_locked"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(locked), passphrase="pw", rounds=4)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {locked}\n")
    subprocess.run(["ssh-add", "-q", str(fleet.hub.key_path)], env=ssh_agent, check=True, capture_output=True)
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent["SSH_AUTH_SOCK"])
    inventory = Inventory([fleet.server("srv-1", key_path=None)])
    result = local_executor(inventory, ssh_options=_options(ssh_config=config)).run(ECHO, servers="srv-1")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    off = local_executor(inventory, ssh_options=_options(ssh_config=config, agent=False)).run(ECHO, servers="srv-1")
    assert off["srv-1"].error_kind == "auth" and f"passed over {locked}" in off["srv-1"].error, off["srv-1"].error


def test_no_key_file_and_no_agent_offers_no_default_key_behind_our_back(
    local_servers, local_executor, tmp_path, monkeypatch
) -> None:
    """As OpenSSH: an ``IdentityFile`` of the config that does not exist means no key file at
    all (OpenSSH adds its default ~/.ssh/id_* keys only when no IdentityFile is configured), not
    asyncssh's own default keys; and "tried no key" is then true."""
    fleet = local_servers(1)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    shutil.copy(fleet.hub.key_path, tmp_path / ".ssh" / "id_ed25519")  # authorized, but not configured
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {tmp_path}/.ssh/id_missing\n")
    inventory = Inventory([fleet.server("srv-1", key_path=None)])
    executor = local_executor(inventory, ssh_options=_options(ssh_config=config, agent=False))
    assert executor.pool.resolve(inventory["srv-1"]).key_files == ()
    result = executor.run(ECHO, servers="srv-1")
    assert result["srv-1"].error_kind == "auth", result.summary.to_string()
    assert "tried no key" in result["srv-1"].error
