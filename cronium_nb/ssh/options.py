"""Settings of the SSH transport, in one explicit object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST_KEY_POLICIES = ("strict", "accept-new", "off")
# SSHOptions.ssh_config's default: this file when it exists (as OpenSSH reads it); None: no file.
DEFAULT_SSH_CONFIG = "~/.ssh/config"
PassphraseSource = str | Callable[[str], str] | None
# AES-GCM first: with AES-NI, asyncssh decrypts it with ~40% less CPU per byte than
# ChaCha20-Poly1305 (its default first choice; 100 MB of output: 0.42 against 0.75 s of CPU
# here), and sshd encrypts it cheaper too. All are OpenSSH's defaults, none weaker.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


@dataclass(frozen=True)
class SSHOptions:
    """How the executor connects.

    ``host_key_policy``: ``"strict"`` checks the server's key against its ``known_hosts`` file
    (the server's own, else ``~/.ssh/known_hosts``); ``"accept-new"`` also records the first key
    of a host never seen before into ``accept_new_known_hosts`` and refuses a changed one;
    ``"off"`` accepts any key (with a warning).

    A host's ``StrictHostKeyChecking`` in the ssh config decides its policy (``yes``/``ask``:
    strict; ``accept-new``: accept-new); ``no``/``off`` never turns checking off silently: it is
    taken as ``accept-new``, with a warning (only ``host_key_policy="off"`` here turns it off).

    ``ssh_config``: the OpenSSH client config to honour (``Host`` aliases, ``HostName``, ``User``,
    ``Port``, ``IdentityFile``, ``ProxyJump``, ``UserKnownHostsFile``, ``StrictHostKeyChecking``,
    ``ConnectTimeout``), parsed by asyncssh; the default ``"~/.ssh/config"`` is read when it
    exists, another path must exist, ``None`` reads none. Values in the inventory win.

    ``agent``: use the keys of the ssh-agent at ``SSH_AUTH_SOCK`` (when set) besides key files.
    ``passphrase``: for key files protected by one: the passphrase, or a callable given the key's
    path that returns it; ``None`` asks (``getpass`` in a terminal, the notebook's password field
    in Jupyter) once per key and process. It is never stored or logged: the decrypted key is
    kept in memory for the process, as ssh-agent would.

    Connect retries: a connection refused or reset while connecting is tried again, at most
    ``connect_attempts`` times in all, ``connect_backoff`` seconds apart (the last value
    repeated), and never past the event's timeout; a refused key or a host key that does not
    match is never retried.

    ``ciphers``: the encryption algorithms offered, in order of preference (the server picks the
    first it also has).

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
    ssh_config: str | Path | None = DEFAULT_SSH_CONFIG
    agent: bool = True
    passphrase: PassphraseSource = field(default=None, repr=False, compare=False)
    connect_attempts: int = 4
    connect_backoff: tuple[float, ...] = (1.0, 2.0, 4.0)
    ciphers: tuple[str, ...] = PREFERRED_CIPHERS

    def __post_init__(self) -> None:
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise ValueError(
                f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, got {self.host_key_policy!r}"
            )
        for name in ("max_channels_per_connection", "max_connections_per_server", "max_connections",
                     "max_handshakes_per_host", "keepalive_count_max", "connect_attempts"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("connect_timeout", "keepalive_interval", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not self.ciphers:
            raise ValueError("ciphers must name at least one encryption algorithm")
        if self.runner_daemon_idle_timeout < 0:
            raise ValueError("runner_daemon_idle_timeout must be 0 (no daemon) or positive")
        backoff = tuple(self.connect_backoff)
        if not backoff or any(not isinstance(s, (int, float)) or s < 0 for s in backoff):
            raise ValueError("connect_backoff must be a non-empty sequence of seconds (0 or more)")
        object.__setattr__(self, "connect_backoff", backoff)
