"""Plain data the rest of the package passes around: servers, events, statuses, results."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from cronium_nb.errors import CroniumError
from cronium_nb.manifest import (
    DEFAULT_GRACE_S,
    DEFAULT_TIMEOUT_S,
    SCRIPT_TYPES,
    Manifest,
    ManifestError,
    validate_env,
)

MIN_PORT, MAX_PORT = 1, 65535
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Server:
    """One SSH target.

    ``port``, ``user``, ``key_path`` and ``known_hosts`` default to ``None``: what OpenSSH would
    use, i.e. the user's ``~/.ssh/config`` (``Host`` aliases, ``HostName``, ``User``, ``Port``,
    ``IdentityFile``, ``ProxyJump``, ``UserKnownHostsFile``, ...; see ``SSHOptions.ssh_config``),
    else OpenSSH's defaults (port 22, the local user name, ``~/.ssh/id_*`` and ssh-agent keys,
    ``~/.ssh/known_hosts``). A value given here wins over the config. ``jump`` names another
    inventory server to connect through (a bastion; it may have its own ``jump``);
    ``forward_agent`` forwards the local ssh-agent to this server (off by default);
    ``become`` runs every event's script on this server through sudo, as if the event said
    ``become=True`` (see :mod:`cronium_nb.become`).
    ``key_path`` and ``known_hosts`` are expanded (``~``) on creation. ``site`` names the
    network the server lives in: through a Dask cluster (``Executor(cluster=client)``) it runs on
    a worker that offers the resource ``site-<site>``; ``None``: on any worker.
    """

    name: str
    host: str
    port: int | None = None
    user: str | None = None
    key_path: str | None = None
    known_hosts: str | None = None
    jump: str | None = None
    forward_agent: bool = False
    site: str | None = None
    become: bool = False

    def __post_init__(self) -> None:
        for text_field in ("name", "host", "user", "jump"):
            value = getattr(self, text_field)
            if value is None and text_field in ("user", "jump"):
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"server {text_field} must be a non-empty string, got {value!r}")
            if "\0" in value:  # it reaches the script's environment, where NUL cannot be
                raise ValueError(f"server {text_field} must not contain NUL bytes, got {value!r}")
        check_host(self.host, f"server {self.name!r}")
        if self.user is not None and (self.user.startswith("-") or any(c.isspace() for c in self.user)):
            # (an @ is allowed: directory users log in as user@domain)
            raise ValueError(
                f"server {self.name!r}: user must not start with - or contain whitespace, got {self.user!r}"
            )
        if self.port is not None:
            check_port(self.port, f"server {self.name!r}")
        if self.jump == self.name:
            raise ValueError(f"server {self.name!r}: jump names the server itself")
        for flag in ("forward_agent", "become"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"server {self.name!r}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.site is not None and (not isinstance(self.site, str) or not SITE_NAME.fullmatch(self.site)):
            raise ValueError(
                f"server {self.name!r}: site must be letters, digits, '.', '_' or '-' (it becomes the Dask "
                f"worker resource site-<site>), got {self.site!r}"
            )
        for path_field in ("key_path", "known_hosts"):
            value = getattr(self, path_field)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise ValueError(f"server {self.name!r}: {path_field} must be a path, got {value!r}")
                object.__setattr__(self, path_field, os.path.expanduser(os.fspath(value)))

    @property
    def address(self) -> str:
        """``user@host:port``, for messages (the parts given; the connection's own, resolved
        through the ssh config, is :attr:`cronium_nb.ssh.resolve.Target.address`)."""
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port or 22}"


def check_host(host: str, what: str) -> None:
    """Refuse a host name that could forge or widen a known_hosts line or pass as an option."""
    if any(character.isspace() or character in ",*?!|#@" for character in host) or host.startswith("-"):
        # It is written into known_hosts lines, where whitespace, a newline or a pattern
        # character would forge entries or widen them to other hosts.
        raise ValueError(
            f"{what}: host must not contain whitespace or any of , * ? ! | # @, nor start with -, got {host!r}"
        )


def check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{what}: port must be an integer, got {port!r}")
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"{what}: port {port} out of range {MIN_PORT}-{MAX_PORT}")


SERVER_FIELDS = tuple(f.name for f in fields(Server))


class EventError(CroniumError, ValueError):
    """An event that cannot run, found before anything is sent to a server."""


MAX_JSON_DEPTH = 512  # the runner refuses JSON nested deeper (runner/PROTOCOL.md)
# The run context holds the input one level down, and each variable two ({"variables": {name: ...}}).
MAX_INPUT_DEPTH = MAX_JSON_DEPTH - 1
MAX_VARIABLE_DEPTH = MAX_JSON_DEPTH - 2


def json_depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests (a scalar is 1), counted up to ``limit + 1`` at most."""
    level, depth = [value], 0
    while level and depth <= limit:
        depth += 1
        level = [item for node in level if isinstance(node, (list, dict)) for item in
                 (node.values() if isinstance(node, dict) else node)]  # fmt: skip
    return depth


def variable_too_deep(name: str, value: Any) -> str | None:
    """Why a variable may not be stored, or None: stored, a value nested deeper than
    ``MAX_VARIABLE_DEPTH`` would make the run context of every later run too deep for the runner."""
    if json_depth(value, MAX_VARIABLE_DEPTH) > MAX_VARIABLE_DEPTH:
        return f"variable '{name}' is nested deeper than {MAX_VARIABLE_DEPTH} levels"
    return None


def check_input(value: Any) -> None:
    """Raise :class:`EventError` unless ``value`` is JSON the runner accepts: JSON-able, no NaN
    or infinity, nested at most ``MAX_INPUT_DEPTH`` levels."""
    too_deep = EventError(f"input is nested deeper than {MAX_INPUT_DEPTH} levels")
    try:
        json.dumps(value, allow_nan=False)
    except RecursionError:
        raise too_deep from None
    except (TypeError, ValueError) as error:
        raise EventError(f"input is not JSON-able: {error}") from None
    if json_depth(value, MAX_INPUT_DEPTH) > MAX_INPUT_DEPTH:
        raise too_deep


@dataclass(frozen=True)
class Event:
    """What to run: a named script of one type, with its limits and data.

    ``env`` values go into the payload manifest; ``secrets`` are environment values too, but
    they travel only on the runner's stdin (never in a manifest, a command line or a log) and
    are redacted wherever output is stored or shown. ``input`` is the default input of a run.
    ``become=True`` runs the script as ``become_user`` through sudo (the runner itself stays the
    login user's; see :mod:`cronium_nb.become`); a server's own ``become`` turns it on there too.
    """

    name: str
    script: str
    type: str = "bash"
    timeout: float = DEFAULT_TIMEOUT_S
    input: Any = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    grace_period: float = DEFAULT_GRACE_S
    become: bool = False
    become_user: str = "root"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise EventError(f"event name must be a non-empty string, got {self.name!r}")
        if "\0" in self.name:  # it reaches the script's environment (CRONIUM_EVENT), where NUL cannot be
            raise EventError(f"event name must not contain NUL bytes, got {self.name!r}")
        if self.type not in SCRIPT_TYPES:
            raise EventError(f"unknown script type {self.type!r}; expected one of {', '.join(SCRIPT_TYPES)}")
        if not isinstance(self.script, str) or not self.script.strip():
            raise EventError(f"event {self.name!r} has an empty script")
        for label, seconds in (("timeout", self.timeout), ("grace_period", self.grace_period)):
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise EventError(f"event {self.name!r}: {label} must be a positive number of seconds, got {seconds!r}")
        try:
            check_input(self.input)
        except EventError as error:
            raise EventError(f"event {self.name!r}: {error}") from None
        if not isinstance(self.become, bool):
            raise EventError(f"event {self.name!r}: become must be true or false, got {self.become!r}")
        check_become_user(self.become_user, f"event {self.name!r}")
        overlap = set(self.env) & set(self.secrets)
        if overlap:
            raise EventError(f"event {self.name!r}: {', '.join(sorted(overlap))} set both in env and secrets")
        for label, mapping in (("env", self.env), ("secrets", self.secrets)):
            if not isinstance(mapping, dict):
                raise EventError(f"event {self.name!r}: {label} must be a mapping of names to strings")
        try:
            self.manifest()
            validate_env(self.secrets)
        except ManifestError as error:
            message = str(error).replace("manifest field", "field")
            raise EventError(f"event {self.name!r}: {message}") from None

    def manifest(self) -> Manifest:
        """The payload manifest: everything that defines the script, nothing per run, no secret."""
        return Manifest(
            name=self.name,
            type=self.type,
            entrypoint="script" + SCRIPT_TYPES[self.type][0],
            timeout=float(self.timeout),
            grace_period=float(self.grace_period),
            env=dict(self.env),
        )


# The only become_user for now: a non-root user could not reach the runner, its helpers and
# the run's work dir, which stay in the login user's private cache (README, "Running as root").
BECOME_USERS = ("root",)


def check_become_user(user: object, what: str) -> None:
    """Refuse a become_user that sudo could misread (an option, a #uid) or that is not supported."""
    if not isinstance(user, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9._-]{0,63}", user):
        raise EventError(f"{what}: become_user must be a user name, got {user!r}")
    if user not in BECOME_USERS:
        raise EventError(
            f"{what}: become_user {user!r} is not supported: only root (the runner and the run's work dir "
            "live in the login user's private cache, which another unprivileged user cannot reach)"
        )


class Status(str, Enum):
    """Status of an execution and of each server in it (one set of names for both)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"  # an execution: every server succeeded
    PARTIAL = "partial"  # an execution: some servers succeeded
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a server: a rollout stopped (max_fail) before its batch began; it ran nothing
    INTERRUPTED = "interrupted"  # the orchestrator died while it ran (found on the next open)
    DETACHED = "detached"  # a detached run goes on on its servers, followed by no orchestrator

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self not in (Status.PENDING, Status.RUNNING, Status.DETACHED)
