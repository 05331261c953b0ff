"""Host-key checking policies for asyncssh connections."""

from __future__ import annotations

import fcntl
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import asyncssh

from cronium_nb.errors import HostKeyError

if TYPE_CHECKING:
    from cronium_nb.ssh.resolve import Target

_record_lock = threading.Lock()


class HostAndPort(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int | None: ...


def _known_hosts_files(target: Target) -> list[Path]:
    return [Path(os.path.expanduser(path)) for path in target.known_hosts]


def _host_pattern(server: HostAndPort) -> str:
    port = server.port or 22
    return server.host if port == 22 else f"[{server.host}]:{port}"


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


def match_known_hosts(paths: list[Path], server: HostAndPort) -> KnownHostsMatch:
    found = KnownHostsMatch([], [], [], [])
    port = server.port or 22
    for path in paths:
        if path.is_file():
            keys, ca_keys, *_others = parsed_file(path, asyncssh.read_known_hosts).match(server.host, "", port)
            all_revoked, revoked_entries = parsed_file(path, _revocations)
            found.keys.extend(keys)
            found.ca_keys.extend(ca_keys)
            found.revoked.extend(revoked_entries.match(server.host, "", port)[0])
            found.all_revoked.extend(all_revoked)
    return found


class _AcceptNewClient(asyncssh.SSHClient):
    """Trust on first use: asyncssh asks it only about a key that no known_hosts line trusts and
    none revokes. The key is recorded when the host matches nothing at all (no plain, CA or
    revoked line), decided again under a lock that other threads and processes respect, so two
    connections opened at once to a new host cannot record two different keys."""

    def __init__(self, record_file: Path, sources: list[Path], server: HostAndPort) -> None:
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


def connect_options(target: Target, accept_new_file: Path) -> dict[str, Any]:
    """The ``known_hosts`` / ``client_factory`` arguments of ``asyncssh.connect`` for the
    target's policy (``target.host_key_policy``).

    A key listed as ``@revoked`` is refused under every policy; a host certificate signed by a
    matching ``@cert-authority`` key is accepted under "strict" and "accept-new"."""
    known_hosts, policy = _known_hosts_files(target), target.host_key_policy
    if policy == "off":
        warnings.warn(f"host key checking is off for {target.name}: the connection can be intercepted", stacklevel=3)
        revoked = match_known_hosts([*known_hosts, accept_new_file], target).all_revoked
        return {"known_hosts": ([], [], revoked), "client_factory": _AnyKeyClient}
    if policy == "strict":
        if not any(path.is_file() for path in known_hosts):
            files = ", ".join(map(str, known_hosts)) or "(none: UserKnownHostsFile none)"
            raise HostKeyError(
                f"no known_hosts file {files} to verify {target.address}: add the host key there "
                f"(ssh-keyscan -p {target.port} {target.host}, checked by hand), "
                "or use host_key_policy='accept-new'"
            )
        return {"known_hosts": match_known_hosts(known_hosts, target).as_connect_argument()}
    sources = [*known_hosts, accept_new_file]
    return {
        "known_hosts": match_known_hosts(sources, target).as_connect_argument(),
        "client_factory": lambda: _AcceptNewClient(accept_new_file, sources, target),
    }


def describe_host_key_failure(target: Target, error: Exception) -> str:
    files = _known_hosts_files(target)
    where = (", ".join(map(str, files)) or "known_hosts") if target.host_key_policy == "strict" else "known_hosts"
    return (
        f"host key of {target.address} does not match {where}: refusing to connect "
        f"(the server was reinstalled, or someone is intercepting the connection: check the key, "
        f"then remove the old line with ssh-keygen -R) [{error}]"
    )
