"""Payload archives (``payload.tar.gz``: ``manifest.yaml`` and the script) and their cache.

The archive is deterministic: the same manifest and script give the same bytes (fixed mtimes,
owner, order and gzip header), so its SHA-256 identifies the content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from cronium_nb.manifest import MANIFEST_NAME, Manifest
from cronium_nb.model import Event
from cronium_nb.store import PayloadRow, Store

FIXED_MTIME = 0
DEFAULT_KEEP_VERSIONS = 5
DEFAULT_RETENTION_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class PayloadArchive:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def build_archive(
    manifest: Manifest, script: str | bytes, extra_files: dict[str, bytes] | None = None
) -> PayloadArchive:
    """A deterministic gzip tar of the manifest, the script (as ``manifest.entrypoint``) and
    ``extra_files`` (for tests of the runner's defences; the executor never adds any)."""
    script_bytes = script.encode() if isinstance(script, str) else script
    files = {MANIFEST_NAME: manifest.to_text().encode(), manifest.entrypoint: script_bytes, **(extra_files or {})}
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), FIXED_MTIME, 0o600
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(files[name]))
    gz_buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buffer, mtime=FIXED_MTIME) as compressed:
        compressed.write(tar_buffer.getvalue())
    data = gz_buffer.getvalue()
    return PayloadArchive(data=data, sha256=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class PreparedPayload:
    """A payload ready to ship: its bytes, checksum and the version the store knows it as."""

    event_id: int
    version: int
    sha256: str
    path: Path
    data: bytes
    cache: str  # "hit" (file reused), "new" (new version) or "rebuilt" (missing or corrupt file rewritten)

    @property
    def size(self) -> int:
        return len(self.data)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


ARCHIVE_CACHE_SIZE = 64


class PayloadService:
    """Builds payload archives and caches them under ``<state dir>/storage/payloads/``.

    An event's archive is built in memory (deterministically; the last 64 distinct ones are kept
    in memory) and compared by SHA-256 with the newest recorded version: equal content
    reuses the cached file, new content becomes version + 1 with a ``runner_payloads`` row. A
    cached file that is missing or no longer matches its hash is written again, never shipped.
    Per-run data (execution id, input, variables, secrets) is not in the archive: it travels on
    the runner's stdin.
    """

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.store = store
        self.directory = state_dir / "storage" / "payloads"
        self.keep_versions = keep_versions
        self.retention_s = retention_s
        self._built: dict[tuple[str, str | bytes], PayloadArchive] = {}

    def _archive(self, event: Event) -> PayloadArchive:
        """The event's archive; built once per distinct content (gzip costs more than a run)."""
        manifest = event.manifest()
        key = (manifest.to_text(), event.script)
        archive = self._built.get(key)
        if archive is None:
            archive = build_archive(manifest, event.script)
            if len(self._built) >= ARCHIVE_CACHE_SIZE:
                self._built.pop(next(iter(self._built)))
            self._built[key] = archive
        return archive

    def prepare(self, event: Event) -> PreparedPayload:
        archive = self._archive(event)
        event_id = self.store.upsert_event(event.name, event.type)
        newest = next(iter(self.store.payloads(event_id)), None)
        if newest is not None and newest.hash == archive.sha256:
            path = Path(newest.path)
            try:
                cached = path.read_bytes()
            except OSError:
                cached = b""
            if hashlib.sha256(cached).hexdigest() == archive.sha256:
                return PreparedPayload(event_id, newest.version, archive.sha256, path, cached, "hit")
            _write_private(path, archive.data)
            return PreparedPayload(event_id, newest.version, archive.sha256, path, archive.data, "rebuilt")
        version = self.store.event_payload_version(event_id) + 1
        path = self.directory / str(event_id) / f"v{version}-{archive.sha256[:16]}.tar.gz"
        _write_private(path, archive.data)
        row = self.store.add_payload(event_id, archive.sha256, str(path), archive.size)
        return PreparedPayload(event_id, row.version, archive.sha256, path, archive.data, "new")

    def cleanup(self, now: float | None = None) -> list[Path]:
        """Keep the newest ``keep_versions`` of each event; drop older ones past the retention
        age too (the newest version always stays); remove files no row refers to."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        doomed: list[int] = []
        by_event: dict[int, list[PayloadRow]] = {}
        for row in self.store.payloads():
            by_event.setdefault(row.event_id, []).append(row)
        for rows in by_event.values():
            for rank, row in enumerate(rows):  # newest first
                if rank >= self.keep_versions or (rank > 0 and now - row.created_at > self.retention_s):
                    doomed.append(row.id)
                    removed.append(Path(row.path))
        self.store.delete_payloads(doomed)
        kept = {Path(row.path) for row in self.store.payloads()}
        if self.directory.is_dir():
            removed += [p for p in self.directory.rglob("*.tar.gz") if p not in kept and p not in removed]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed
