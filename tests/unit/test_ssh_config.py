"""Resolving a server through the OpenSSH config (cronium_nb.ssh.resolve), and the inventory's
jump checks: no SSH server needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cronium_nb import Inventory, Server, SSHOptions
from cronium_nb.errors import ConnectError
from cronium_nb.inventory import InventoryError
from cronium_nb.ssh.resolve import Resolver, resolved_rows


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def _resolver(tmp_path: Path, text: str, servers: list[Server] = (), **options) -> Resolver:  # type: ignore[assignment]
    inventory = {server.name: server for server in servers}
    return Resolver(SSHOptions(ssh_config=_config(tmp_path, text), **options), lambda: inventory)


def test_a_host_alias_takes_every_value_from_the_config(tmp_path: Path) -> None:
    key = tmp_path / "id_web"
    key.write_text("not read here")
    resolver = _resolver(
        tmp_path,
        f"""
Host web
    HostName 10.1.2.3
    User deploy
    Port 2222
    IdentityFile {key}
    UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2
    ConnectTimeout 7
    StrictHostKeyChecking accept-new
Host *
    User nobody
""",
    )
    target = resolver.resolve(Server(name="web", host="web"))
    assert (target.host, target.port, target.user) == ("10.1.2.3", 2222, "deploy")
    assert target.key_files == (str(key),)
    assert target.known_hosts == (f"{tmp_path}/kh1", f"{tmp_path}/kh2")
    assert target.connect_timeout == 7.0 and target.host_key_policy == "accept-new"
    origins = dict(target.origins)
    for name in ("host", "port", "user", "keys", "known_hosts", "connect_timeout", "host_key_policy"):
        assert origins[name] == "ssh_config", name
    assert target.address == "deploy@10.1.2.3:2222"


def test_inventory_values_win_and_defaults_are_openssh_s(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* here
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    resolver = _resolver(tmp_path, "Host web\n  User deploy\n  Port 2222\n  IdentityFile /nowhere/key\n")
    explicit = resolver.resolve(Server(name="web", host="web", user="root", port=22, key_path="/k", known_hosts="/kh"))
    assert (explicit.user, explicit.port, explicit.key_files, explicit.known_hosts) == ("root", 22, ("/k",), ("/kh",))
    assert {explicit.origin(n) for n in ("user", "port", "keys", "known_hosts")} == {"inventory"}
    other = resolver.resolve(Server(name="db", host="db.example.com"))
    assert other.port == 22 and other.origin("port") == "default"
    assert other.user == os.environ.get("USER", other.user) and other.origin("user") == "default"
    assert other.key_files == () and other.agent_path is None  # no default key files, no agent
    assert other.known_hosts[0] == str(tmp_path / ".ssh" / "known_hosts")
    assert other.host_key_policy == "strict" and other.connect_timeout == SSHOptions().connect_timeout
    # a missing IdentityFile of the config is skipped, as OpenSSH skips it
    assert resolver.resolve(Server(name="web", host="web")).key_files == ()


def test_ssh_config_none_reads_no_file_and_a_missing_path_is_an_error(tmp_path: Path) -> None:
    text = "Host web\n  HostName 10.9.9.9\n"
    off = Resolver(SSHOptions(ssh_config=None))
    assert off.resolve(Server(name="web", host="web")).host == "web"
    with pytest.raises(ConnectError, match="does not exist"):
        Resolver(SSHOptions(ssh_config=tmp_path / "missing")).resolve(Server(name="web", host="web"))
    assert _resolver(tmp_path, text).resolve(Server(name="web", host="web")).host == "10.9.9.9"


def test_a_changed_config_is_read_again(tmp_path: Path) -> None:
    resolver = _resolver(tmp_path, "Host web\n  Port 2201\n")
    assert resolver.resolve(Server(name="web", host="web")).port == 2201
    path = tmp_path / "ssh_config"
    path.write_text("Host web\n  Port 2202\n")
    os.utime(path, ns=(1, 1))
    assert resolver.resolve(Server(name="web", host="web")).port == 2202


def test_strict_host_key_checking_no_is_taken_as_accept_new_and_said(tmp_path: Path) -> None:
    resolver = _resolver(tmp_path, "Host lab\n  StrictHostKeyChecking no\n")
    with pytest.warns(UserWarning, match="taken as accept-new"):
        target = resolver.resolve(Server(name="lab", host="lab"))
    assert target.host_key_policy == "accept-new" and "taken as accept-new" in target.notes[0]
    # only SSHOptions(host_key_policy="off") turns checking off
    off = _resolver(tmp_path, "Host lab\n  StrictHostKeyChecking yes\n", host_key_policy="off")
    assert off.resolve(Server(name="lab", host="lab")).host_key_policy == "off"
    with pytest.raises(ConnectError, match="not yes, ask, accept-new or no"):
        _resolver(tmp_path, "Host lab\n  StrictHostKeyChecking maybe\n").resolve(Server(name="lab", host="lab"))


def test_a_dangerous_hostname_from_the_config_is_refused(tmp_path: Path) -> None:
    resolver = _resolver(tmp_path, "Host evil\n  HostName *.example.com\nHost opt\n  HostName -oProxyCommand=x\n")
    for alias in ("evil", "opt"):
        with pytest.raises(ConnectError, match="host must not contain"):
            resolver.resolve(Server(name=alias, host=alias))


def test_proxy_jump_chains_and_inventory_names(tmp_path: Path) -> None:
    bastion = Server(name="bastion", host="10.0.0.1", user="jumper", port=2200)
    resolver = _resolver(
        tmp_path,
        """
Host inner
    ProxyJump outer,middle
Host middle
    HostName 10.0.0.2
Host viainv
    ProxyJump bastion
Host direct
    ProxyJump none
Host loop-a
    ProxyJump loop-b
Host loop-b
    ProxyJump loop-a
""",
        servers=[bastion],
    )
    inner = resolver.resolve(Server(name="inner", host="inner"))
    assert [hop.name for hop in inner.chain] == ["outer", "middle"]
    assert inner.jump is not None and inner.jump.host == "10.0.0.2" and inner.origin("jump") == "ssh_config"
    via = resolver.resolve(Server(name="viainv", host="viainv"))
    assert via.jump is not None and (via.jump.name, via.jump.user, via.jump.port) == ("bastion", "jumper", 2200)
    assert resolver.resolve(Server(name="direct", host="direct")).jump is None
    with pytest.raises(ConnectError, match="go round"):
        resolver.resolve(Server(name="loop-a", host="loop-a"))
    user_port = _resolver(tmp_path, "Host t\n  ProxyJump ops@gw.example.com:2022\n").resolve(Server(name="t", host="t"))
    assert user_port.jump is not None and user_port.jump.address == "ops@gw.example.com:2022"


def test_inventory_jumps_chain_and_shared_targets(tmp_path: Path) -> None:
    servers = [
        Server(name="edge", host="10.0.0.1", user="u", port=22),
        Server(name="mid", host="10.0.0.2", user="u", port=22, jump="edge"),
        Server(name="app", host="10.0.0.3", user="u", port=22, jump="mid"),
        Server(name="app-again", host="10.0.0.3", user="u", port=22, jump="mid"),
    ]
    resolver = Resolver(SSHOptions(ssh_config=None), lambda: {s.name: s for s in servers})
    app = resolver.resolve(servers[2])
    assert [hop.name for hop in app.chain] == ["edge", "mid"] and app.origin("jump") == "inventory"
    assert app.route == "u@10.0.0.3:22 via u@10.0.0.1:22,u@10.0.0.2:22"  # host facts are kept by it
    assert resolver.resolve(servers[3]).key == app.key  # the pool shares connections by the resolved values
    assert resolver.resolve(servers[1]).key == app.jump.key
    rows = {row["name"]: row for row in resolved_rows(servers, resolver)}
    assert rows["app"]["jump"] == "edge -> mid" and "jump: inventory" in rows["app"]["origins"]


def test_jump_cycles_and_unknown_jumps_are_refused_at_load(tmp_path: Path) -> None:
    cycle = """servers:
  - {name: a, host: h1, jump: b}
  - {name: b, host: h2, jump: c}
  - {name: c, host: h3, jump: a}
"""
    with pytest.raises(InventoryError, match=r"<inventory>:2: server 'a': jump hosts form a cycle: a -> b -> c -> a"):
        Inventory.from_yaml(cycle)
    with pytest.raises(InventoryError, match=r":3: server 'b': jump 'nope' is not a server of the inventory"):
        Inventory.from_yaml("servers:\n  - {name: a, host: h1}\n  - {name: b, host: h2, jump: nope}\n")
    with pytest.raises(ValueError, match="jump names the server itself"):
        Server(name="a", host="h", jump="a")
    with pytest.raises(InventoryError, match="cycle"):
        Inventory([Server(name="a", host="h", jump="b"), Server(name="b", host="h", jump="a")])
    loaded = Inventory.from_yaml(
        "servers:\n  - {name: gw, host: gw.example.com, user: ops}\n"
        "  - {name: app, host: 10.0.0.3, jump: gw, forward_agent: true}\n"
    )
    assert loaded["app"].jump == "gw" and loaded["app"].forward_agent and loaded["app"].port is None


def test_server_validation_still_refuses_dangerous_values() -> None:
    for host in ("a b", "h\nx", "*.example.com", "-oProxyCommand=x", "a,b", "u@h"):
        with pytest.raises(ValueError, match="host must not contain"):
            Server(name="s", host=host)
    for user in ("-oFoo", "a b", "a\nb"):
        with pytest.raises(ValueError, match="user must not"):
            Server(name="s", host="h", user=user)
    assert Server(name="s", host="h", user="jane@corp.example").user == "jane@corp.example"  # directory users
    with pytest.raises(ValueError, match="forward_agent must be true or false"):
        Server(name="s", host="h", forward_agent="yes")  # type: ignore[arg-type]


def test_cronium_servers_shows_resolved_values_and_their_origin(tmp_path: Path, monkeypatch) -> None:
    from cronium_nb.notebook.magics import CroniumMagics

    monkeypatch.setenv("HOME", str(tmp_path))
    ssh_dir = tmp_path / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text("Host web\n  HostName 10.1.1.1\n  User deploy\n  Port 2222\n")
    inventory = tmp_path / "servers.yaml"
    inventory.write_text(
        "servers:\n  - {name: gw, host: gw.example.com, user: ops}\n  - {name: web, host: web, jump: gw}\n"
    )
    magics = CroniumMagics(shell=None)
    frame = magics.cronium_servers(str(inventory)).set_index("name")
    assert (frame.loc["web", "host"], frame.loc["web", "port"], frame.loc["web", "user"]) == (
        "10.1.1.1",
        2222,
        "deploy",
    )
    assert frame.loc["web", "jump"] == "gw" and frame.loc["gw", "port"] == 22
    assert "port: ssh_config" in frame.loc["web", "origins"] and "user: inventory" in frame.loc["gw", "origins"]
    raw = magics.cronium_servers("--raw").set_index("name")
    assert raw.loc["web", "host"] == "web" and raw.loc["web", "jump"] == "gw"


def test_cronium_servers_takes_another_ssh_config_for_the_notebook(tmp_path: Path, monkeypatch) -> None:
    from IPython.core.error import UsageError

    from cronium_nb.notebook.magics import CroniumMagics

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config of the machine's own
    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))
    config = tmp_path / "fleet_ssh_config"
    config.write_text("Host gateway\n  HostName 10.9.9.9\n  Port 2200\nHost app\n  ProxyJump gateway\n")
    inventory = tmp_path / "servers.yaml"
    inventory.write_text("servers:\n  - {name: gateway, host: gateway}\n  - {name: app, host: app}\n")
    magics = CroniumMagics(shell=None)
    try:
        frame = magics.cronium_servers(f"{inventory} --ssh-config {config}").set_index("name")
        assert (frame.loc["gateway", "host"], frame.loc["gateway", "port"]) == ("10.9.9.9", 2200)
        assert frame.loc["app", "jump"] == "gateway" and "jump: ssh_config" in frame.loc["app", "origins"]
        executor = magics.session.executor
        assert executor.ssh_options.ssh_config == config
        with pytest.raises(UsageError, match="is not a file"):
            magics.cronium_servers(f"--ssh-config {tmp_path / 'missing'}")
        assert magics.session.executor is executor  # nothing changed
        other = tmp_path / "other_ssh_config"
        other.write_text("")
        frame = magics.cronium_servers(f"--ssh-config {other}").set_index("name")
        assert frame.loc["gateway", "host"] == "gateway" and frame.loc["app", "jump"] == "-"
        assert magics.session.executor is not executor and magics.session.executor.ssh_options.ssh_config == other
    finally:
        magics.session.close()


def test_the_unlock_widget_unlocks_a_key_and_clears_the_field(tmp_path: Path) -> None:
    import asyncssh

    from cronium_nb.notebook.passphrase import unlock_widget
    from cronium_nb.ssh import keys

    path = tmp_path / "id_locked"
    key = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.warns(UserWarning, match="bcrypt"):
        key.write_private_key(str(path), passphrase="s3cret", rounds=4)
    widget = unlock_widget(str(path))
    field, button = widget.children[0].children
    status = widget.children[1]
    field.value = "nope"
    button.click()
    assert field.value == "" and "wrong passphrase" in status.value
    field.value = "s3cret"
    button.click()
    assert field.value == "" and "unlocked" in status.value and "s3cret" not in status.value
    assert keys.load_key(str(path), None).public_data == key.public_data  # no prompt: kept for the process


def test_asking_for_a_passphrase_uses_the_notebook_frontend_or_says_what_to_do(monkeypatch) -> None:
    import io
    from types import SimpleNamespace

    import IPython

    from cronium_nb.ssh.keys import KeyNeedsPassphrase, ask_passphrase

    prompts: list[str] = []
    kernel = SimpleNamespace(_allow_stdin=True, getpass=lambda prompt: prompts.append(prompt) or "pw")
    monkeypatch.setattr(IPython, "get_ipython", lambda: SimpleNamespace(kernel=kernel))
    assert ask_passphrase("/k") == "pw" and prompts == ["Passphrase for /k: "]
    kernel._allow_stdin = False  # nbclient, or a frontend without input requests
    with pytest.raises(KeyNeedsPassphrase, match=r"cannot ask for input.*%cronium_unlock /k") as refused:
        ask_passphrase("/k")
    assert refused.value.error_kind == "auth"
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # not a terminal
    with pytest.raises(KeyNeedsPassphrase, match=r"SSHOptions\(passphrase=\.\.\.\), add the key to ssh-agent"):
        ask_passphrase("/k")
