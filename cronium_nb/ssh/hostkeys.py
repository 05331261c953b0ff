"""Host-key checking policies for asyncssh connections."""

from __future__ import annotations

import fcntl
import os
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import asyncssh

from cronium_nb.errors import HostKeyError
from cronium_nb.model import Server

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_record_lock = threading.Lock()


def _known_hosts_file(server: Server) -> Path:
    return Path(os.path.expanduser(server.known_hosts or DEFAULT_KNOWN_HOSTS))


def _host_pattern(server: Server) -> str:
    return server.host if server.port == 22 else f"[{server.host}]:{server.port}"


class KnownHostsMatch(NamedTuple):
    """What known_hosts files say about one host: plain keys and ``@cert-authority`` keys whose
    patterns match it, ``@revoked`` keys whose patterns match it, and every ``@revoked`` key of
    the files (a revoked key is refused for every host, as OpenSSH's RevokedHostKeys are)."""

    keys: list[asyncssh.SSHKey]
    ca_keys: list[asyncssh.SSHKey]
    revoked: list[asyncssh.SSHKey]
    all_revoked: list[asyncssh.SSHKey]

    @property
    def empty(self) -> bool:
        """Nothing names the host: only then is it new, for trust on first use."""
        return not (self.keys or self.ca_keys or self.revoked)

    def as_connect_argument(self) -> tuple[list, list, list]:
        return (self.keys, self.ca_keys, self.all_revoked)


def _revocations(path: str) -> tuple[list[asyncssh.SSHKey], asyncssh.SSHKnownHosts]:
    """A file's ``@revoked`` keys, and its revoked lines as plain entries, to ask which hosts they
    name (asyncssh drops revoked keys of ``[host]:port`` patterns when the host has no trusted key)."""
    entries = [
        line.split(None, 1)[1]
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.split()[:1] == ["@revoked"] and len(line.split()) >= 4
    ]
    keys = [asyncssh.import_public_key(" ".join(entry.split()[1:3])) for entry in entries]
    return keys, asyncssh.import_known_hosts("\n".join(entries) + "\n")


def match_known_hosts(paths: list[Path], server: Server) -> KnownHostsMatch:
    found = KnownHostsMatch([], [], [], [])
    for path in paths:
        if path.is_file():
            keys, ca_keys, *_others = parsed_file(path, asyncssh.read_known_hosts).match(server.host, "", server.port)
            all_revoked, revoked_entries = parsed_file(path, _revocations)
            found.keys.extend(keys)
            found.ca_keys.extend(ca_keys)
            found.revoked.extend(revoked_entries.match(server.host, "", server.port)[0])
            found.all_revoked.extend(all_revoked)
    return found


class _AcceptNewClient(asyncssh.SSHClient):
    """Trust on first use: asyncssh asks it only about a key that no known_hosts line trusts and
    none revokes. The key is recorded when the host matches nothing at all (no plain, CA or
    revoked line), decided again under a lock that other threads and processes respect, so two
    connections opened at once to a new host cannot record two different keys."""

    def __init__(self, record_file: Path, sources: list[Path], server: Server) -> None:
        self._record_file, self._sources, self._server = record_file, sources, server

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self._record_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _record_lock, open(self._record_file, "a", encoding="utf-8") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)  # other processes recording into the same file
            now = match_known_hosts(self._sources, self._server)
            if not now.empty:  # a known host presenting another key, or one recorded meanwhile
                return key in now.keys and key not in now.all_revoked
            stream.write(f"{_host_pattern(self._server)} {key.export_public_key('openssh').decode().strip()}\n")
        return True


class _AnyKeyClient(asyncssh.SSHClient):
    """Policy "off": any key that no known_hosts line revokes."""

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
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


def connect_options(server: Server, policy: str, accept_new_file: Path) -> dict[str, Any]:
    """The ``known_hosts`` / ``client_factory`` arguments of ``asyncssh.connect`` for a policy.

    A key listed as ``@revoked`` is refused under every policy; a host certificate signed by a
    matching ``@cert-authority`` key is accepted under "strict" and "accept-new"."""
    known_hosts = _known_hosts_file(server)
    if policy == "off":
        warnings.warn(f"host key checking is off for {server.name}: the connection can be intercepted", stacklevel=3)
        revoked = match_known_hosts([known_hosts, accept_new_file], server).all_revoked
        return {"known_hosts": ([], [], revoked), "client_factory": _AnyKeyClient}
    if policy == "strict":
        if not known_hosts.is_file():
            raise HostKeyError(
                f"no known_hosts file {known_hosts} to verify {server.address}: add the host key there, "
                "or use host_key_policy='accept-new'"
            )
        return {"known_hosts": match_known_hosts([known_hosts], server).as_connect_argument()}
    sources = [known_hosts, accept_new_file]
    return {
        "known_hosts": match_known_hosts(sources, server).as_connect_argument(),
        "client_factory": lambda: _AcceptNewClient(accept_new_file, sources, server),
    }


def describe_host_key_failure(server: Server, policy: str, error: Exception) -> str:
    where = _known_hosts_file(server) if policy == "strict" else "known_hosts"
    return (
        f"host key of {server.address} does not match {where}: refusing to connect "
        f"(the server was reinstalled, or someone is intercepting the connection) [{error}]"
    )
