"""Host-key checking policies for asyncssh connections."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import asyncssh

from cronium_nb.model import Server

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_record_lock = threading.Lock()


class HostKeyError(Exception):
    """The server's host key could not be verified, with what to do about it."""


def _known_hosts_file(server: Server) -> Path:
    return Path(os.path.expanduser(server.known_hosts or DEFAULT_KNOWN_HOSTS))


def _host_pattern(server: Server) -> str:
    return server.host if server.port == 22 else f"[{server.host}]:{server.port}"


class _AcceptNewClient(asyncssh.SSHClient):
    """Trusts a host's first key (recording it) and nothing else afterwards."""

    def __init__(self, record_file: Path, pattern: str, had_keys: bool) -> None:
        self._record_file, self._pattern, self._had_keys = record_file, pattern, had_keys

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if self._had_keys:
            return False  # a known host presenting another key: refuse
        line = f"{self._pattern} {key.export_public_key('openssh').decode().strip()}\n"
        with _record_lock:
            self._record_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self._record_file, "a", encoding="utf-8") as stream:
                stream.write(line)
        return True


_parsed: dict[tuple[str, Any], tuple[tuple[int, int, int], Any]] = {}
_parsed_lock = threading.Lock()


def parsed_file(path: Path | str, parse: Any) -> Any:
    """``parse(path)``, remembered while the file keeps its inode, size and mtime: a fan-out
    to many servers reads and parses the known_hosts file and the key once, not per connection."""
    stat = os.stat(path)
    identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key = (str(path), parse)
    with _parsed_lock:
        cached = _parsed.get(key)
        if cached is None or cached[0] != identity:
            cached = _parsed[key] = (identity, parse(str(path)))
    return cached[1]


def _keys_for(path: Path, server: Server) -> list[asyncssh.SSHKey]:
    if not path.is_file():
        return []
    trusted = asyncssh.read_known_hosts(str(path)).match(server.host, "", server.port)
    return list(trusted[0])


def connect_options(server: Server, policy: str, accept_new_file: Path) -> dict[str, Any]:
    """The ``known_hosts`` / ``client_factory`` arguments of ``asyncssh.connect`` for a policy."""
    if policy == "off":
        warnings.warn(f"host key checking is off for {server.name}: the connection can be intercepted", stacklevel=3)
        return {"known_hosts": None}
    known_hosts = _known_hosts_file(server)
    if policy == "strict":
        if not known_hosts.is_file():
            raise HostKeyError(
                f"no known_hosts file {known_hosts} to verify {server.address}: add the host key there, "
                "or use host_key_policy='accept-new'"
            )
        return {"known_hosts": parsed_file(known_hosts, asyncssh.read_known_hosts)}
    trusted = _keys_for(known_hosts, server) + _keys_for(accept_new_file, server)
    return {
        "known_hosts": (trusted, [], []),
        "client_factory": lambda: _AcceptNewClient(accept_new_file, _host_pattern(server), bool(trusted)),
    }


def describe_host_key_failure(server: Server, policy: str, error: Exception) -> str:
    where = _known_hosts_file(server) if policy == "strict" else "known_hosts"
    return (
        f"host key of {server.address} does not match {where}: refusing to connect "
        f"(the server was reinstalled, or someone is intercepting the connection) [{error}]"
    )
