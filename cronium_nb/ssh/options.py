"""Settings of the SSH transport, in one explicit object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HOST_KEY_POLICIES = ("strict", "accept-new", "off")


@dataclass(frozen=True)
class SSHOptions:
    """How the executor connects.

    ``host_key_policy``: ``"strict"`` checks the server's key against its ``known_hosts`` file
    (the server's own, else ``~/.ssh/known_hosts``); ``"accept-new"`` also records the first key
    of a host never seen before into ``accept_new_known_hosts`` and refuses a changed one;
    ``"off"`` accepts any key (with a warning).

    Keepalives: a link that stops answering is declared dead after about
    ``keepalive_interval * keepalive_count_max`` seconds (30 s by default).
    """

    connect_timeout: float = 30.0
    keepalive_interval: float = 10.0
    keepalive_count_max: int = 3
    host_key_policy: str = "strict"
    accept_new_known_hosts: Path | None = None  # default: <state dir>/known_hosts
    # Below sshd's MaxSessions (10): sshd frees a session a moment after the client has seen its
    # channel close, so a connection used to the last slot sees "open failed" now and then.
    max_channels_per_connection: int = 8
    max_connections_per_server: int = 4
    max_connections: int = 256
    max_handshakes_per_host: int = 8  # below sshd's MaxStartups (10)
    idle_timeout: float = 300.0
    # The runner daemon (one per user and server, reached through a Unix socket) exits after this
    # long without a connection; 0: no daemon, a runner process is started per connection.
    runner_daemon_idle_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise ValueError(
                f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, got {self.host_key_policy!r}"
            )
        for name in ("max_channels_per_connection", "max_connections_per_server", "max_connections",
                     "max_handshakes_per_host", "keepalive_count_max"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("connect_timeout", "keepalive_interval", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.runner_daemon_idle_timeout < 0:
            raise ValueError("runner_daemon_idle_timeout must be 0 (no daemon) or positive")
