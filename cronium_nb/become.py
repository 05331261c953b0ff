"""Running a script as root through sudo ("become"), and the sudo password.

``Event(become=True)`` (or a server's ``become: true`` in the inventory) runs the script as
``become_user`` (root) with sudo. The runner, its cache and the run's work dir stay the login
user's (one deployment serves both); the runner starts ``sudo -S -p <prompt> -u root --
cronium-runner become-exec``, answers sudo's prompt on sudo's stdin and hands the run over
(see ``runner/PROTOCOL.md``, "Become"). Here, before a run, :class:`BecomeAuth` finds out per
server whether its sudo wants a password (``sudo -n -u USER -- true``, remembered for the
executor's life) and only then gets one: ``Executor(become_password=...)`` (the password, or a
callable that returns it), else a prompt once per executor and login user (``getpass`` in a
terminal, the notebook frontend's password field in Jupyter:
:func:`cronium_nb.ssh.keys.ask_hidden`): the prompt names that user, and what is typed there is
never sent to another account's sudo.

The password goes to the runner inside the run context, on the SSH channel's stdin, and only to
servers whose sudo asks for one; it is never put in a command line, the environment, a
manifest, a log, the store or an error (the execution's redactor masks it too).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from typing import Any

from cronium_nb.errors import CroniumError, ErrorKind
from cronium_nb.model import Event, Server
from cronium_nb.ssh.keys import PromptUnavailable, ask_hidden
from cronium_nb.ssh.pool import PooledConnection

BecomePasswordSource = str | Callable[[], str] | None
PASSWORD_ADVICE = "give Executor(become_password=...), or run where a password prompt can be answered"
# What sudo -n says when it would have to ask (sudo 1.8 and 1.9).
PASSWORD_REQUIRED = ("a password is required", "a terminal is required")


class BecomeError(CroniumError):
    """sudo cannot run a server's script as the become user: its reason, for that server's row."""

    error_kind: ErrorKind = "become"


def become_user(event: Event, server: Server) -> str | None:
    """The user ``event`` runs as on ``server`` through sudo, or None (the login user)."""
    return event.become_user if event.become or server.become else None


def check_password(password: str) -> str:
    """A sudo password is one line (it is written to sudo's stdin, ended by a newline)."""
    if not isinstance(password, str) or any(c in password for c in "\n\r\0"):
        raise BecomeError("the become password must be one line of text")
    return password


class BecomeAuth:
    """Per executor: which servers' sudo wants a password, and that password, asked for at most
    once per login user (a fan-out's servers wait for the one prompt)."""

    def __init__(self, password: BecomePasswordSource = None) -> None:
        if password is not None and not callable(password):
            check_password(password)
        self._source = password
        self._passwords: dict[str, str] = {}  # login user -> the password asked for (or given)
        self._asking = asyncio.Lock()
        self._needs_password: dict[tuple[Any, str], bool] = {}  # (connection key, user) -> sudo asks

    async def context(self, pooled: PooledConnection, user: str) -> dict[str, Any] | None:
        """The run context's ``become``: the user, and the password only where sudo asks for one;
        None when the connection logs in as that user already (no sudo needed)."""
        if pooled.target.user == user:
            return None
        key = (pooled.key, user)
        if key not in self._needs_password:
            self._needs_password[key] = await self._probe(pooled, user)
        password = await self.password(pooled, user) if self._needs_password[key] else None
        return {"user": user, "password": password}

    async def _probe(self, pooled: PooledConnection, user: str) -> bool:
        """Whether sudo on this connection's server wants a password to run as ``user``; a
        BecomeError when it cannot be used at all (not installed, refused without asking)."""
        command = f"sudo -n -u {shlex.quote(user)} -- true"
        result = await pooled.connection.run(command, check=False, encoding="utf-8", errors="replace")
        if result.exit_status == 0:
            return False
        said = " ".join(str(result.stderr).split())[-500:]
        if any(text in said for text in PASSWORD_REQUIRED):
            return True
        if result.exit_status == 127:
            raise BecomeError(f"become: sudo is not installed on this server ({said or 'command not found'})")
        raise BecomeError(f"become: sudo refused to run as {user}: {said or f'exit {result.exit_status}'}")

    async def password(self, pooled: PooledConnection, user: str) -> str:
        """The password: given, or asked for once per login user (in a worker thread: a prompt
        blocks)."""
        async with self._asking:
            target = pooled.target
            if target.user not in self._passwords:
                prompt = f"sudo password for {target.user}@{target.host} (to run as {user}): "
                try:
                    answer = check_password(await asyncio.to_thread(self._obtain, prompt))
                except PromptUnavailable as error:
                    raise BecomeError(
                        f"become: sudo on this server needs a password to run as {user}, and none could be had "
                        f"({error}); {PASSWORD_ADVICE}"
                    ) from None
                self._passwords[target.user] = answer
            return self._passwords[target.user]

    def _obtain(self, prompt: str) -> str:
        if callable(self._source):
            return self._source()
        if self._source is not None:
            return self._source
        answer = ask_hidden(prompt)
        if not answer:
            raise PromptUnavailable("the password given was empty")
        return answer
