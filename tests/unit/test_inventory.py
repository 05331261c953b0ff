"""Inventory and Server: loading, selection, and every error case with file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cronium_nb import Inventory, InventoryError, Server, UnknownServerError

GOOD = """\
defaults: {user: deploy, key_path: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts}
servers:
  - {name: web1, host: 10.0.0.5}
  - {name: web2, host: 10.0.0.6, port: 2222}
  - {name: db1, host: 10.0.0.7, user: root}
groups:
  web: [web1, web2]
  data: db1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "servers.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> InventoryError:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as caught:
        Inventory.load(path)
    assert str(caught.value).startswith(f"{path}:"), str(caught.value)
    return caught.value


def test_load_applies_defaults_and_groups(tmp_path: Path) -> None:
    inventory = Inventory.load(write(tmp_path, GOOD))
    assert [s.name for s in inventory] == ["web1", "web2", "db1"]
    web2 = inventory["web2"]
    assert (web2.host, web2.port, web2.user) == ("10.0.0.6", 2222, "deploy")
    assert web2.key_path == str(Path("~/.ssh/id_ed25519").expanduser())
    assert inventory["db1"].user == "root"
    assert inventory["web1"].port is None  # None: what the ssh config or OpenSSH (22) says
    assert inventory.groups == {"web": ("web1", "web2"), "data": ("db1",)}


def test_select_by_names_groups_and_all(tmp_path: Path) -> None:
    inventory = Inventory.load(write(tmp_path, GOOD))
    names = lambda spec: [s.name for s in inventory.select(spec)]  # noqa: E731
    assert names("web") == ["web1", "web2"]
    assert names("db1,web1") == ["web1", "db1"]  # inventory order
    assert names(["web", "web1"]) == ["web1", "web2"]  # no repeats
    assert names("all") == ["web1", "web2", "db1"]
    assert names(" data , web2 ") == ["web2", "db1"]


def test_select_unknown_name_lists_what_is_known(tmp_path: Path) -> None:
    inventory = Inventory.load(write(tmp_path, GOOD))
    with pytest.raises(UnknownServerError, match=r"unknown server or group 'web3'; known: web1, web2, db1, web, data"):
        inventory.select("web1,web3")
    with pytest.raises(UnknownServerError, match="no servers selected"):
        inventory.select(" , ")


def test_dataframe_has_one_row_per_server(tmp_path: Path) -> None:
    frame = Inventory.load(write(tmp_path, GOOD)).to_dataframe()
    assert list(frame["name"]) == ["web1", "web2", "db1"]
    assert list(frame["groups"]) == ["web", "web", "data"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("servers:\n  - {name: a, host: h\n", 3, "invalid YAML"),
        ("servers:\n  - name: a\n    host: [unclosed\n", 4, "invalid YAML"),
        ("servers:\n  - {name: a, host: h}\n  - {name: b}\n", 3, "server 'b' has no host"),
        ("servers:\n  - {name: a, host: h}\n  - {name: b, host: ''}\n", 3, "server 'b' has no host"),
        ("servers:\n  - {name: a, host: h}\n  - {name: a, host: h2}\n", 3, "duplicate server name 'a'"),
        (
            "servers:\n  - {name: a, host: h}\ngroups:\n  web:\n    - a\n    - ghost\n",
            6,
            "group 'web': member 'ghost' is not a server",
        ),
        ("servers:\n  - name: a\n    host: h\n    hots: x\n", 4, "unknown key 'hots' in server 'a'"),
        ("servers:\n  - {name: a, host: h}\nservres: []\n", 3, "unknown key 'servres'"),
        ("defaults:\n  usr: root\nservers:\n  - {name: a, host: h}\n", 2, "unknown key 'usr' in defaults"),
        ("servers:\n  - name: a\n    host: h\n    port: 70000\n", 4, "port 70000 out of range 1-65535"),
        ("servers:\n  - name: a\n    host: h\n    port: 0\n", 4, "port 0 out of range 1-65535"),
        ("defaults: {port: 99999}\nservers:\n  - {name: a, host: h}\n", 3, "port 99999 out of range"),
        ("servers:\n  - name: a\n    host: h\n    port: twenty\n", 4, "port must be an integer"),
        ("servers:\n  - {name: a, host: h, name: b}\n", 2, "duplicate key 'name'"),
        ("servers: []\n", 1, "'servers' must be a non-empty list"),
        ("- just a list\n", 1, "must be a mapping"),
        ("servers:\n  - {host: h}\n", 2, "server has no name"),
        ("servers:\n  - {name: a, host: h}\ngroups:\n  a: [a]\n", 4, "group 'a' has the name of a server"),
    ],
    ids=[
        "yaml-flow",
        "yaml-block",
        "no-host",
        "empty-host",
        "duplicate-name",
        "group-member",
        "unknown-server-key",
        "unknown-top-key",
        "unknown-default-key",
        "port-high",
        "port-zero",
        "port-from-defaults",
        "port-not-int",
        "duplicate-yaml-key",
        "no-servers",
        "not-a-mapping",
        "no-name",
        "group-clashes",
    ],
)
def test_inventory_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    error = load_error(tmp_path, text)
    assert error.line == line, str(error)
    assert message in str(error)
    assert str(error).startswith(f"{tmp_path / 'servers.yaml'}:{line}: ")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"nope\.yaml: cannot read inventory: No such file"):
        Inventory.load(tmp_path / "nope.yaml")


def test_server_validation() -> None:
    with pytest.raises(ValueError, match="port 65536 out of range"):
        Server(name="a", host="h", port=65536)
    with pytest.raises(ValueError, match="host must be a non-empty string"):
        Server(name="a", host=" ")
    with pytest.raises(ValueError, match="port must be an integer"):
        Server(name="a", host="h", port=True)
    assert Server(name="a", host="h", key_path="~/k").key_path == str(Path("~/k").expanduser())


def test_programmatic_inventory_checks_groups() -> None:
    servers = [Server(name="a", host="h"), Server(name="b", host="h")]
    with pytest.raises(InventoryError, match="duplicate server name 'a'"):
        Inventory([*servers, Server(name="a", host="x")])
    with pytest.raises(InventoryError, match="member 'c' is not a server"):
        Inventory(servers, {"g": ["a", "c"]})
    with pytest.raises(InventoryError, match="'all' is reserved"):
        Inventory(servers, {"all": ["a"]})
    merged = Inventory(servers[:1]).merged(Inventory(servers[1:], {"g": ["b"]}))
    assert [s.name for s in merged.select("all")] == ["a", "b"]
    assert [s.name for s in merged.without(["b"])] == ["a"]
