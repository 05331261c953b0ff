"""Reading a payload: checksum first, then a safe extraction into a private work dir."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from cronium_runner.exitcodes import RunnerError, RunnerExit
from cronium_runner.manifest import MANIFEST_NAME, Manifest, ManifestError

MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
MAX_EXTRACTED_BYTES = 1024 * 1024 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data: bytes, expected_sha256: str | None) -> None:
    if expected_sha256 is None:
        return
    actual = sha256_hex(data)
    if actual != expected_sha256.strip().lower():
        raise RunnerError(
            RunnerExit.CHECKSUM_MISMATCH, f"payload checksum mismatch: expected {expected_sha256}, got {actual}"
        )


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) mode 0700, and refuse it unless it is a real directory that
    we own and nobody else can write: another user, or a symlink, could redirect our files."""
    try:
        missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
        for directory in reversed(missing):  # parents too are created private, not with the umask
            directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as error:
        raise RunnerError(RunnerExit.WORKDIR, f"cannot create work root {path}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RunnerError(RunnerExit.WORKDIR, f"work root {path} is not a directory (a symlink?)")
    if info.st_uid != os.geteuid():
        raise RunnerError(RunnerExit.WORKDIR, f"work root {path} is owned by uid {info.st_uid}, not by us")
    if info.st_mode & 0o077:
        raise RunnerError(
            RunnerExit.WORKDIR, f"work root {path} is accessible by others (mode {info.st_mode & 0o777:o})"
        )
    return path


def make_workdir(root: Path) -> Path:
    """A fresh 0700 per-run directory under the private ``root``."""
    private_dir(root)
    return Path(tempfile.mkdtemp(prefix="run-", dir=root))


def _safe_member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not name.parts or member.name.startswith("/"):
        raise RunnerError(RunnerExit.BAD_PAYLOAD, f"unsafe path in payload: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise RunnerError(RunnerExit.BAD_PAYLOAD, f"payload member {member.name!r} is not a regular file or directory")
    return name


Contents = list[tuple[PurePosixPath, "bytes | tarfile.ExFileObject | None"]]


def _members(archive: tarfile.TarFile) -> tuple[Contents, int]:
    """Every member's safe relative path and a reader of its content (None: a directory), all
    checked before anything is read; and the size of them all."""
    members = archive.getmembers()
    for member in members:
        _safe_member_path(member)
    size = sum(member.size for member in members if member.isfile())
    if size > MAX_EXTRACTED_BYTES:
        raise RunnerError(RunnerExit.BAD_PAYLOAD, "payload expands beyond the size limit")
    return [(_safe_member_path(m), None if m.isdir() else archive.extractfile(m)) for m in members], size


def _write_members(contents: Contents, workdir: Path) -> None:
    for path, content in contents:
        target = workdir.joinpath(*path.parts)
        if content is None:
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:  # streamed: a large member never sits in memory whole
                while chunk := content.read(1024 * 1024):
                    out.write(chunk)


# A runner session sees the same small payloads again and again: their checked contents are
# kept by checksum, so a repeated run skips gunzip and tar (the files are still written anew).
_recent: dict[str, Contents] = {}
RECENT_MAX_ENTRIES = 16
RECENT_MAX_SIZE = 1024 * 1024  # unpacked


def extract(data: bytes, workdir: Path, sha256: str | None = None) -> Manifest:
    """Extract the payload archive into ``workdir`` and return its validated manifest.

    Only regular files and directories with relative paths are accepted: no absolute paths,
    no ``..``, no links, no devices. Files are created exclusively, never through a symlink.
    ``sha256``: the payload's verified checksum, under which a small payload's contents are
    remembered for the next run.
    """
    contents = _recent.get(sha256) if sha256 else None
    try:
        if contents is not None:
            _write_members(contents, workdir)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                contents, size = _members(archive)
                if sha256 and size <= RECENT_MAX_SIZE:
                    contents = [(path, None if r is None else r.read()) for path, r in contents]
                    if len(_recent) >= RECENT_MAX_ENTRIES:
                        _recent.pop(next(iter(_recent)))
                    _recent[sha256] = contents
                _write_members(contents, workdir)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise RunnerError(RunnerExit.BAD_PAYLOAD, f"payload is not a valid gzip tar archive: {error}") from None
    manifest_path = workdir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise RunnerError(RunnerExit.BAD_PAYLOAD, f"payload has no {MANIFEST_NAME}")
    try:
        manifest = Manifest.from_text(manifest_path.read_text(encoding="utf-8"))
    except (ManifestError, TypeError, UnicodeDecodeError) as error:
        raise RunnerError(RunnerExit.BAD_MANIFEST, f"invalid manifest: {error}") from None
    if not (workdir / manifest.entrypoint).is_file():
        raise RunnerError(RunnerExit.BAD_PAYLOAD, f"payload has no entrypoint {manifest.entrypoint!r}")
    return manifest
