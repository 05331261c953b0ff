"""Payload archives: ``payload.tar.gz`` holding ``manifest.yaml`` and the script.

The archive is deterministic: the same manifest and script give the same bytes (fixed mtimes,
owner, order and gzip header), so its SHA-256 identifies the content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass

from cronium_runner.manifest import MANIFEST_NAME, Manifest

FIXED_MTIME = 0


@dataclass(frozen=True)
class PayloadArchive:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def build_archive(manifest: Manifest, script: str | bytes, extra_files: dict[str, bytes] | None = None) -> PayloadArchive:
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
