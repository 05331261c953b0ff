"""Become, before anything runs: the event's and the inventory's settings are checked, the
password is checked and asked for at most once per executor (the fleet tests,
tests/integration/test_become.py, show sudo itself)."""

from __future__ import annotations

import asyncio
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cronium_nb import Event, EventError, Inventory, InventoryError, Server
from cronium_nb.become import BecomeAuth, BecomeError, become_user
from cronium_nb.errors import ERROR_KINDS


def test_event_become_settings_are_checked() -> None:
    assert Event(name="e", script="id -u", become=True).become_user == "root"
    with pytest.raises(EventError, match="become must be true or false, got 'yes'"):
        Event(name="e", script="true", become="yes")  # type: ignore[arg-type]
    for bad in ("-u", "#0", "a b", "", "x" * 70):
        with pytest.raises(EventError, match="become_user must be a user name"):
            Event(name="e", script="true", become=True, become_user=bad)
    with pytest.raises(EventError, match="become_user 'postgres' is not supported: only root"):
        Event(name="e", script="true", become=True, become_user="postgres")


def test_a_servers_become_default_turns_become_on_there(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(
        textwrap.dedent("""\
        servers:
          - {name: web1, host: 10.0.0.5}
          - {name: db1, host: 10.0.0.7, become: true}
        """)
    )
    inventory = Inventory.load(path)
    plain, sudo = Event(name="e", script="true"), Event(name="e", script="true", become=True)
    assert [become_user(plain, s) for s in inventory] == [None, "root"]
    assert [become_user(sudo, s) for s in inventory] == ["root", "root"]
    path.write_text("servers:\n  - {name: db1, host: h}\n  - {name: db2, host: h, become: maybe}\n")
    with pytest.raises(InventoryError, match=r"servers.yaml:3: .*become must be true or false, got 'maybe'"):
        Inventory.load(path)
    with pytest.raises(ValueError, match="become must be true or false"):
        Server(name="s", host="h", become=1)  # type: ignore[arg-type]


def test_become_is_an_error_kind_and_a_password_is_one_line() -> None:
    assert "become" in ERROR_KINDS and BecomeError("x").error_kind == "become"
    with pytest.raises(BecomeError, match="one line"):
        BecomeAuth("two\nlines")


def _connection(user: str = "ops") -> Any:
    return SimpleNamespace(target=SimpleNamespace(user=user, host="web1"))


def test_the_password_is_asked_once_however_many_servers_need_it() -> None:
    asked: list[str] = []
    threads: set[int] = set()

    def ask() -> str:
        asked.append("asked")
        threads.add(threading.get_ident())
        return "s3cret"

    auth = BecomeAuth(ask)

    async def fan_out() -> list[str]:
        return await asyncio.gather(*(auth.password(_connection(), "root") for _ in range(5)))

    assert asyncio.run(fan_out()) == ["s3cret"] * 5
    assert asked == ["asked"] and threading.get_ident() not in threads  # asked off the loop


def test_a_login_as_root_needs_no_sudo_to_become_root() -> None:
    assert asyncio.run(BecomeAuth().context(_connection("root"), "root")) is None  # nothing run, nothing asked


def test_no_password_and_nobody_to_ask_is_a_clear_become_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", None)  # no terminal
    auth = BecomeAuth()
    with pytest.raises(BecomeError) as refused:
        asyncio.run(auth.password(_connection(), "root"))
    assert "needs a password to run as root, and none could be had" in str(refused.value)
    assert "Executor(become_password=...)" in str(refused.value)


def test_a_password_asked_for_one_login_user_is_not_sent_for_another() -> None:
    """The prompt names the login user (``sudo password for operator@web1``): what is typed there
    is that user's password, and must not be handed to another account's sudo (on this or another
    server). Servers logged into as the same user share the one answer."""
    asked: list[int] = []
    answers = iter(["operator-pw", "deploy-pw"])

    def ask() -> str:
        asked.append(1)
        return next(answers)

    auth = BecomeAuth(ask)

    async def passwords() -> list[str]:
        return [await auth.password(_connection(user), "root") for user in ("operator", "operator", "deploy")]

    assert asyncio.run(passwords()) == ["operator-pw", "operator-pw", "deploy-pw"]
    assert asked == [1, 1]
    given = BecomeAuth("one-for-all")  # a password given to the executor is the user's choice for all
    assert asyncio.run(given.password(_connection("deploy"), "root")) == "one-for-all"
