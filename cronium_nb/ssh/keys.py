"""Client key files, passphrase-protected ones included.

A key file protected by a passphrase is decrypted once per process: with
``SSHOptions(passphrase=...)`` (the passphrase, or a callable given the key's path), else by
asking — ``getpass`` in a terminal, the notebook's password field in Jupyter (the frontend's
input request), or ``%cronium_unlock PATH`` (a password widget) beforehand. The passphrase is
never stored or logged; the decrypted key stays in this process's memory, as ssh-agent keeps it.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
from collections.abc import Callable

import asyncssh

from cronium_nb.errors import ConnectError
from cronium_nb.ssh.hostkeys import parsed_file

_unlocked: dict[tuple[str, tuple[int, int, int]], asyncssh.SSHKey] = {}
_lock = threading.Lock()  # one prompt at a time, so a fan-out asks once per key
PASSPHRASE_ADVICE = (
    "give SSHOptions(passphrase=...), add the key to ssh-agent (ssh-add {path}), "
    "or in a notebook run %cronium_unlock {path} first"
)


class KeyNeedsPassphrase(ConnectError):
    """A key file is protected by a passphrase and none could be had."""

    def __init__(self, path: str, why: str = "no passphrase was given and none can be asked for here") -> None:
        super().__init__(
            f"key {path} is protected by a passphrase: {why}; " + PASSPHRASE_ADVICE.format(path=path),
            error_kind="auth",
        )


def _identity(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _encrypted(error: Exception) -> bool:
    return isinstance(error, asyncssh.KeyImportError) and "passphrase" in str(error).lower()


class PromptUnavailable(Exception):
    """Nobody can be asked for a secret here (no terminal, a frontend without input); why."""


def ask_hidden(prompt: str) -> str:
    """Ask the person at the keyboard for a secret, not echoed: the notebook frontend's password
    field when running in a Jupyter kernel that allows input, ``getpass`` in a terminal; else
    :class:`PromptUnavailable` (blocking: call it in a worker thread)."""
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
    except ImportError:
        kernel = None
    if kernel is not None:
        if not getattr(kernel, "_allow_stdin", False):
            raise PromptUnavailable("this notebook frontend cannot ask for input")
        try:
            return str(kernel.getpass(prompt))
        except Exception as error:  # e.g. StdinNotImplementedError: the frontend cannot answer
            raise PromptUnavailable(f"the notebook could not ask ({error})") from None
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise PromptUnavailable("none was given and none can be asked for here (no terminal, no notebook)")


def ask_passphrase(path: str) -> str:
    """Ask for a key file's passphrase (:func:`ask_hidden`); else :class:`KeyNeedsPassphrase`."""
    try:
        return ask_hidden(f"Passphrase for {path}: ")
    except PromptUnavailable as why:
        raise KeyNeedsPassphrase(path, str(why)) from None


def unlock(path: str, passphrase: str) -> asyncssh.SSHKey:
    """Decrypt a key file with ``passphrase`` and keep the key for this process."""
    path = os.path.expanduser(path)
    with _lock:
        return _decrypt(path, passphrase)


def _decrypt(path: str, passphrase: str) -> asyncssh.SSHKey:
    try:
        key = asyncssh.read_private_key(path, passphrase)
    except OSError as error:
        raise ConnectError(f"cannot use key {path}: {error.strerror}", error_kind="auth") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
        reason = "wrong passphrase" if isinstance(error, asyncssh.KeyEncryptionError) else str(error)
        raise ConnectError(f"cannot use key {path}: {reason}", error_kind="auth") from None
    _unlocked[(path, _identity(path))] = key
    return key


def load_key(path: str, passphrase: str | Callable[[str], str] | None) -> asyncssh.SSHKey:
    """The private key in ``path``, asking for its passphrase when it has one (blocking: call
    it in a worker thread). Raises :class:`ConnectError` (kind ``auth``) saying what to do."""
    try:
        return parsed_file(path, asyncssh.read_private_key)
    except OSError as error:  # a missing or unreadable key file
        raise ConnectError(f"cannot use key {path}: {error.strerror}", error_kind="auth") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
        if not _encrypted(error):
            raise ConnectError(f"cannot use key {path}: {error}", error_kind="auth") from None
    with _lock:
        cached = _unlocked.get((path, _identity(path)))
        if cached is not None:
            return cached
        if callable(passphrase):
            secret = passphrase(path)
        elif passphrase is not None:
            secret = passphrase
        else:
            secret = ask_passphrase(path)
        if not secret:
            raise KeyNeedsPassphrase(path, "the passphrase given was empty")
        return _decrypt(path, secret)
