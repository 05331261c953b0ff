"""Plain data the rest of the package passes around."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

MIN_PORT, MAX_PORT = 1, 65535


@dataclass(frozen=True)
class Server:
    """One SSH target.

    ``key_path`` and ``known_hosts`` are expanded (``~``) on creation; ``None`` means the
    SSH client's defaults (``~/.ssh/id_*`` and ``~/.ssh/known_hosts``).
    """

    name: str
    host: str
    port: int = 22
    user: str = "root"
    key_path: str | None = None
    known_hosts: str | None = None

    def __post_init__(self) -> None:
        for text_field in ("name", "host", "user"):
            value = getattr(self, text_field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"server {text_field} must be a non-empty string, got {value!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"server {self.name!r}: port must be an integer, got {self.port!r}")
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise ValueError(f"server {self.name!r}: port {self.port} out of range {MIN_PORT}-{MAX_PORT}")
        for path_field in ("key_path", "known_hosts"):
            value = getattr(self, path_field)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise ValueError(f"server {self.name!r}: {path_field} must be a path, got {value!r}")
                object.__setattr__(self, path_field, os.path.expanduser(os.fspath(value)))

    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        return f"{self.user}@{self.host}:{self.port}"


SERVER_FIELDS = tuple(f.name for f in fields(Server))
