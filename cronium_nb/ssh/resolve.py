"""Where a server's connection goes, resolved once: the inventory's values, over the OpenSSH
client config (``SSHOptions.ssh_config``, parsed by asyncssh's own parser), over OpenSSH's
defaults. The result, a :class:`Target`, says where each value came from
(``inventory``, ``ssh_config``, ``options``: the executor's ``SSHOptions``, or ``default``).

Honoured from the config: ``Host`` aliases (the inventory's ``host`` is matched as the alias),
``HostName``, ``User``, ``Port``, ``IdentityFile``, ``ProxyJump``, ``UserKnownHostsFile``,
``StrictHostKeyChecking``, ``ConnectTimeout``, ``IdentityAgent``. ``ForwardAgent`` is not: agent
forwarding is the inventory's ``forward_agent`` only.
"""

from __future__ import annotations

import getpass
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from asyncssh.config import ConfigParseError, SSHClientConfig, SSHConfig

from cronium_nb.errors import ConnectError
from cronium_nb.model import Server, check_host, check_port
from cronium_nb.ssh.options import DEFAULT_SSH_CONFIG, SSHOptions

if TYPE_CHECKING:
    import pandas as pd

    from cronium_nb.inventory import Inventory

DEFAULT_PORT = 22
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_KEY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
MAX_JUMPS = 8
STRICT_VALUES = {"yes": "strict", "ask": "strict", "accept-new": "accept-new", "no": "accept-new", "off": "accept-new"}


class _ClientConfig(SSHClientConfig):
    """asyncssh's client config parser, also keeping ``StrictHostKeyChecking`` (asyncssh skips it)."""

    _handlers = {  # noqa: RUF012 (asyncssh looks its handlers up on the class)
        **SSHClientConfig._handlers,
        "stricthostkeychecking": ("StrictHostKeyChecking", SSHConfig._set_string),
    }


@dataclass(frozen=True)
class Target:
    """One server's connection, fully resolved. ``key`` is what the pool shares connections by."""

    name: str
    host: str
    port: int
    user: str
    key_files: tuple[str, ...]
    known_hosts: tuple[str, ...]
    host_key_policy: str
    connect_timeout: float
    agent_path: str | None
    forward_agent: bool
    jump: Target | None = None
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.host,
            self.port,
            self.user,
            self.key_files,
            self.known_hosts,
            self.host_key_policy,
            self.agent_path,
            self.forward_agent,
            self.jump.key if self.jump else None,
        )

    @property
    def address(self) -> str:
        """``user@host:port``, for messages and the store's host facts."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def route(self) -> str:
        """The address and the jump hosts' (two networks behind two jump hosts may use the same
        private address): what the store's host facts are kept by."""
        hops = [hop.address for hop in self.chain]
        return self.address + (f" via {','.join(hops)}" if hops else "")

    @property
    def chain(self) -> list[Target]:
        """The jump hosts, the first one connected to first."""
        hops: list[Target] = []
        jump = self.jump
        while jump is not None:
            hops.insert(0, jump)
            jump = jump.jump
        return hops

    def origin(self, name: str) -> str:
        return dict(self.origins).get(name, "default")


def _load_config(path: Path | None, host: str, user: str | None, port: int | None) -> _ClientConfig:
    paths = [path] if path is not None else []
    local_user = getpass.getuser()
    try:
        return _ClientConfig.load(None, paths, False, False, False, local_user, user or (), host, port or ())  # type: ignore[return-value]
    except (ConfigParseError, OSError) as error:
        raise ConnectError(
            f"cannot use the ssh config: {error} (fix it, or pass SSHOptions(ssh_config=None) to read none)"
        ) from None


def _parse_jump(entry: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` of a ProxyJump entry (``ssh://`` too)."""
    text = entry.strip().removeprefix("ssh://")
    user, _, rest = text.rpartition("@")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = int(port_text)
    else:
        host = rest
    return user or None, host, port


class Resolver:
    """Resolves servers to :class:`Target` s, remembered per server value and config file
    state. ``servers()`` gives the inventory's servers, which ``jump`` names refer to."""

    def __init__(self, options: SSHOptions, servers: Callable[[], Mapping[str, Server]] | None = None) -> None:
        self.options = options
        self.servers = servers or dict
        self._cache: dict[tuple[Any, ...], Target] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _config_path(self) -> Path | None:
        configured = self.options.ssh_config
        if configured is None:
            return None
        path = Path(os.path.expanduser(os.fspath(configured)))
        if path.is_file():
            return path
        if os.fspath(configured) == DEFAULT_SSH_CONFIG:
            return None  # as OpenSSH: no ~/.ssh/config, no settings
        raise ConnectError(f"ssh config {path} does not exist (SSHOptions(ssh_config=...); None reads none)")

    def _state(self) -> tuple[Any, ...]:
        """What else a resolution depends on: the config file's state and the agent's socket."""
        path, agent = self._config_path(), os.environ.get("SSH_AUTH_SOCK")
        if path is None:
            return (None, agent)
        stat = path.stat()
        return (str(path), stat.st_mtime_ns, stat.st_size, agent)

    def resolve(self, server: Server) -> Target:
        """``server``'s target (raises :class:`ConnectError` saying what to fix)."""
        inventory = self.servers()
        chain, jump_name = [server], server.jump
        while jump_name is not None and jump_name in inventory and len(chain) <= MAX_JUMPS:
            chain.append(inventory[jump_name])
            jump_name = inventory[jump_name].jump
        cache_key = (tuple(chain), self._state())
        with self._lock:
            cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        target = self._resolve(server, inventory, self._config_path(), seen=())
        with self._lock:
            self._cache[cache_key] = target
        return target

    def _resolve(
        self,
        server: Server,
        inventory: Mapping[str, Server],
        config_path: Path | None,
        seen: tuple[str, ...],
        jump_override: Target | bool | None = False,
    ) -> Target:
        if len(seen) > MAX_JUMPS or server.name in seen:
            path = " -> ".join([*seen, server.name])
            raise ConnectError(f"jump hosts of {seen[0]!r} go round or deeper than {MAX_JUMPS}: {path}")
        options, origins, notes = self.options, cast("dict[str, str]", {}), cast("list[str]", [])
        config = _load_config(config_path, server.host, server.user, server.port)
        what = f"server {server.name!r}"

        def pick(name: str, inventory_value: Any, config_option: str, default: Any) -> Any:
            if inventory_value is not None:
                origins[name] = "inventory"
                return inventory_value
            value = config.get(config_option)
            if value is not None:
                origins[name] = "ssh_config"
                return value
            return default

        host = str(config.get("Hostname") or server.host)
        if host != server.host:
            origins["host"] = "ssh_config"
        else:
            origins["host"] = "inventory"
        try:
            check_host(host, f"{what} (HostName from the ssh config)")
            port = int(pick("port", server.port, "Port", DEFAULT_PORT))
            check_port(port, what)
        except ValueError as error:
            raise ConnectError(str(error)) from None
        user = str(pick("user", server.user, "User", getpass.getuser()))

        if server.key_path is not None:
            key_files: tuple[str, ...] = (server.key_path,)
            origins["keys"] = "inventory"
        else:
            identity_files = cast("list[str]", config.get("IdentityFile") or [])
            configured = [os.path.expanduser(str(p)) for p in identity_files]
            origins["keys"] = "ssh_config" if configured else "default"
            candidates = configured or [os.path.expanduser(p) for p in DEFAULT_KEY_FILES]
            key_files = tuple(p for p in candidates if os.path.isfile(p))  # as OpenSSH: missing ones skipped

        if server.known_hosts is not None:
            known_hosts: tuple[str, ...] = (server.known_hosts,)
            origins["known_hosts"] = "inventory"
        else:
            known_hosts_files = cast("list[str]", config.get("UserKnownHostsFile") or [])
            if known_hosts_files:
                origins["known_hosts"] = "ssh_config"
                known_hosts = tuple(os.path.expanduser(str(p)) for p in known_hosts_files if str(p).lower() != "none")
            else:
                known_hosts = tuple(os.path.expanduser(p) for p in DEFAULT_KNOWN_HOSTS)

        policy = options.host_key_policy
        strict = config.get("StrictHostKeyChecking")
        if policy == "off":
            origins["host_key_policy"] = "options"
        elif strict is not None:
            value = str(strict).lower()
            if value not in STRICT_VALUES:
                raise ConnectError(
                    f"{what}: StrictHostKeyChecking {strict!r} in the ssh config is not yes, ask, accept-new or no"
                )
            policy = STRICT_VALUES[value]
            origins["host_key_policy"] = "ssh_config"
            if value in ("no", "off"):
                note = (
                    f"StrictHostKeyChecking {strict} in the ssh config is taken as accept-new for {server.name}: "
                    "cronium_nb records the first key of a new host and refuses a changed one "
                    "(SSHOptions(host_key_policy='off') turns checking off)"
                )
                notes.append(note)
                if server.name not in self._warned:
                    self._warned.add(server.name)
                    warnings.warn(note, stacklevel=4)
        elif policy != "strict":
            origins["host_key_policy"] = "options"

        timeout = config.get("ConnectTimeout")
        if timeout is not None and int(timeout) > 0:  # type: ignore[call-overload]
            connect_timeout = float(timeout)  # type: ignore[arg-type]
            origins["connect_timeout"] = "ssh_config"
        else:
            connect_timeout = options.connect_timeout

        agent_path: str | None = None
        if options.agent:
            identity_agent = config.get("IdentityAgent")
            if identity_agent is not None:
                origins["agent"] = "ssh_config"
                value = str(identity_agent)
                if value.lower() != "none":
                    value = os.environ.get("SSH_AUTH_SOCK", "") if value == "SSH_AUTH_SOCK" else value
                    agent_path = os.path.expanduser(value) or None
            else:
                agent_path = os.environ.get("SSH_AUTH_SOCK") or None
        else:
            origins["agent"] = "options"

        jump: Target | None
        if jump_override is not False:
            jump = jump_override  # type: ignore[assignment]
        elif server.jump is not None:
            if server.jump not in inventory:
                raise ConnectError(f"{what}: jump {server.jump!r} is not a server of the inventory")
            origins["jump"] = "inventory"
            jump = self._resolve(inventory[server.jump], inventory, config_path, (*seen, server.name))
        else:
            proxy = config.get("ProxyJump")
            jump = None
            if proxy and str(proxy).lower() != "none":
                origins["jump"] = "ssh_config"
                jump = self._proxy_jump(str(proxy), server, inventory, config_path, (*seen, server.name))

        return Target(
            name=server.name,
            host=host,
            port=port,
            user=user,
            key_files=key_files,
            known_hosts=known_hosts,
            host_key_policy=policy,
            connect_timeout=connect_timeout,
            agent_path=agent_path,
            forward_agent=server.forward_agent,
            jump=jump,
            origins=tuple(sorted(origins.items())),
            notes=tuple(notes),
        )

    def _proxy_jump(
        self,
        proxy: str,
        server: Server,
        inventory: Mapping[str, Server],
        config_path: Path | None,
        seen: tuple[str, ...],
    ) -> Target:
        """A ProxyJump list ``a,b``: ``b`` reached through ``a``, ``a`` as its own config says.
        An entry naming an inventory server (no user or port given) is that server."""
        previous: Target | bool | None = False
        for entry in proxy.split(","):
            try:
                user, host, port = _parse_jump(entry)
                hop = inventory.get(host) if user is None and port is None else None
                if hop is None:
                    hop = Server(name=entry.strip(), host=host, user=user, port=port)
            except ValueError as error:
                raise ConnectError(f"server {server.name!r}: ProxyJump {entry!r} in the ssh config: {error}") from None
            previous = self._resolve(hop, inventory, config_path, seen, jump_override=previous)
        assert isinstance(previous, Target)
        return previous


FRAME_COLUMNS = ("name", "host", "port", "user", "keys", "agent", "known_hosts", "jump", "host_key_policy",
                 "connect_timeout", "origins", "error")  # fmt: skip


def resolved_rows(servers: list[Server], resolver: Resolver) -> list[dict[str, Any]]:
    """One row per server: the values its connection uses and where each came from."""
    rows: list[dict[str, Any]] = []
    for server in servers:
        try:
            target = resolver.resolve(server)
        except ConnectError as error:
            rows.append({"name": server.name, "host": server.host, "error": str(error)})
            continue
        origins = [f"{name}: {origin}" for name, origin in target.origins if origin != "default"]
        rows.append(
            {
                "name": target.name,
                "host": target.host,
                "port": target.port,
                "user": target.user,
                "keys": ", ".join(target.key_files) or "-",
                "agent": target.agent_path or "-",
                "known_hosts": ", ".join(target.known_hosts) or "-",
                "jump": " -> ".join(hop.name for hop in target.chain) or "-",
                "host_key_policy": target.host_key_policy,
                "connect_timeout": target.connect_timeout,
                "origins": "; ".join([*origins, *target.notes]),
                "error": None,
            }
        )
    return rows


def resolved_frame(inventory: Inventory, options: SSHOptions) -> pd.DataFrame:
    """:func:`resolved_rows` of every server of ``inventory``, as a DataFrame."""
    import pandas as pd

    resolver = Resolver(options, lambda: inventory.servers)
    return pd.DataFrame(resolved_rows(list(inventory), resolver), columns=list(FRAME_COLUMNS))
