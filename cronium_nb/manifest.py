"""The payload manifest as the orchestrator builds and checks it (``runner/PROTOCOL.md`` is the
written schema; the Go runner validates the same fields).

``manifest.yaml`` is written in the JSON subset of YAML: the runner reads it with a JSON parser
and refuses anything else (YAML aliases, tags, comments), so no YAML parser runs on a server.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from cronium_nb.errors import CroniumError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.yaml"
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_GRACE_S = 5.0

# Script type -> (file extension of the entrypoint, interpreter command).
SCRIPT_TYPES: dict[str, tuple[str, str]] = {
    "bash": (".sh", "bash"),
    "sh": (".sh", "sh"),
    "python": (".py", "python3"),
    "node": (".js", "node"),
}

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENTRYPOINT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
RESERVED_ENV_PREFIX = "CRONIUM_"


class ManifestError(CroniumError, ValueError):
    """The manifest does not match the schema; the message names the field."""


@dataclass(frozen=True)
class Manifest:
    """What a payload asks the runner to do. Per-run data (execution id, input of this run,
    variables) travels beside the payload, not in it, so that the archive stays cacheable."""

    name: str
    type: str
    entrypoint: str
    timeout: float = DEFAULT_TIMEOUT_S
    grace_period: float = DEFAULT_GRACE_S
    env: dict[str, str] = field(default_factory=dict)
    input: Any = None
    event: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        validate(asdict(self))

    @property
    def interpreter(self) -> str:
        return SCRIPT_TYPES[self.type][1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """The manifest file's text: JSON, which is also YAML."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        validate(data)
        return cls(**data)

    @classmethod
    def from_text(cls, text: str) -> Manifest:
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as error:
            raise ManifestError(f"manifest is not in the JSON subset of YAML: {error}") from None
        return cls.from_dict(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _number(value: Any) -> bool:
    """A real, finite number (NaN would never time out; infinity is no timeout either)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_env(env: Any) -> None:
    """Environment for the script (the manifest's, or the secret one of a run's context)."""
    if not isinstance(env, dict):
        raise ManifestError("manifest field 'env' must be a mapping of names to strings")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise ManifestError(f"env name {key!r} is not a valid variable name")
        if key.startswith(RESERVED_ENV_PREFIX):
            raise ManifestError(f"env name {key!r} uses the reserved prefix {RESERVED_ENV_PREFIX}")
        if not isinstance(value, str) or "\0" in value:
            raise ManifestError(f"env value of {key!r} must be a string without NUL bytes")


def validate(data: Any) -> None:
    """Raise :class:`ManifestError` naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a mapping")
    known = {"version", "name", "type", "entrypoint", "timeout", "grace_period", "env", "input", "event"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"unknown manifest field(s): {', '.join(map(str, unknown))}")
    for required in ("version", "name", "type", "entrypoint"):
        if required not in data:
            raise ManifestError(f"manifest field {required!r} is missing")
    if data["version"] != MANIFEST_VERSION:
        raise ManifestError(
            f"manifest version {data['version']!r} is not supported (this runner reads {MANIFEST_VERSION})"
        )
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ManifestError("manifest field 'name' must be a non-empty string")
    if data["type"] not in SCRIPT_TYPES:
        raise ManifestError(f"manifest field 'type' must be one of {', '.join(SCRIPT_TYPES)}, got {data['type']!r}")
    entry = data["entrypoint"]
    if not isinstance(entry, str) or not ENTRYPOINT_NAME.match(entry) or entry in (".", ".."):
        raise ManifestError(f"manifest field 'entrypoint' must be a plain file name, got {entry!r}")
    for seconds in ("timeout", "grace_period"):
        value = data.get(seconds, 1)
        if not _number(value) or value <= 0:
            raise ManifestError(
                f"manifest field {seconds!r} must be a positive, finite number of seconds, got {value!r}"
            )
    validate_env(data.get("env", {}))
    if not isinstance(data.get("event", {}), dict):
        raise ManifestError("manifest field 'event' must be a mapping")
    try:
        json.dumps(data.get("input"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise ManifestError(f"manifest field 'input' must be JSON-able: {error}") from None
