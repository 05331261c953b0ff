"""Files in and out: ``Executor.put`` and ``Executor.fetch`` over the pooled SSH connections.

This module owns copying one file to many servers and one file back from each: checking the
request before anything runs, the per-server transfer over SFTP on a pooled connection, the
end-to-end checksum, the result table (:data:`COLUMNS`) and :class:`TransferJob`, the running
transfer a caller can wait for or cancel. All servers are worked on at once (at most the
executor's ``concurrency``); a server that fails (no such file, permission denied, unreachable)
is its own row, and the others go on.

How one ``put`` reaches a server, all on one pooled connection and one channel at a time (the
pool counts one channel per lease, so the SFTP session is closed before the checksum command
runs and a new one opened after it):

1. SFTP creates a temporary file next to the destination, ``.<name>.cronium-<random>.part``,
   with ``O_CREAT|O_EXCL`` and mode 0600, so no other user of the server can read it while it
   fills; the local file is read in ``CHUNK_BYTES`` pieces, hashed (SHA-256) as it is read, and
   each piece written at its offset (asyncssh pipelines the SFTP requests of a piece), so a
   1 GB file never sits in memory. Every server gets the size the file had when the put was
   asked for (a local log still being appended to reaches all servers alike). The file is
   fsynced, given its mode (``mode``, else the replaced file's, else 0644) through the open
   handle (``fsetstat``: never through its name, which another user who can write in the
   directory could swap for a link), and closed.
2. ``sha256sum`` reads the temporary file from the server's own disk. We hash on the server
   rather than read the file back over SFTP: reading back would move every byte a second time
   over the network, while ``sha256sum`` (coreutils or busybox, on every Linux server) checks
   what was really written at the cost of one short process. Its path is passed shell-quoted
   (:func:`shlex.quote`) to ``sh -c``, so no path a user writes can run a command.
3. Only when both digests are equal, and the temporary name still holds a regular file of the
   size written (not a link someone swapped in), it is renamed over the destination
   (``posix-rename@openssh.com``: atomic, an existing file is replaced). Readers of the
   destination see the old file or the whole new one, never a part. On any failure, timeout or
   cancel the temporary file is removed (when the connection still allows it).

Links at the destination are never written through: a link there is replaced by the new file
(rename does not follow it), the replaced file's mode is taken only from a regular file
(``lstat``), and its setuid/setgid bits only when the new file has the same owner (group): an
upload must not become setuid to us because the file it replaced was setuid to someone else.
A destination that is a link to a directory is refused unless the path ends in ``/`` (someone
who can write next to it could otherwise lead the upload into a directory of their choice).

``fetch`` mirrors it: SFTP reads the remote file in pieces into a private (0600) temporary
file in ``DEST/<server>/``, written through the descriptor that created it, hashing as it goes.
It copies the size the file had when opened (a busy log that keeps growing would otherwise never
end); a file that shrinks meanwhile fails. The server then hashes the same number of bytes
(``head -c N | sha256sum``); only equal digests, and a temporary name that still names the file
we wrote, rename it to ``DEST/<server>/<basename>``. The server's name and the remote
basename become local path parts only when they are plain names: ``..``, ``.``, ``/``, NUL or an
empty name are refused before anything runs, and the final path is checked to lie in ``DEST``.

Remote paths: absolute, or relative to the login's home directory (SFTP and the login both
start there); a leading ``~/`` means the home directory too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import asyncssh
import pandas as pd

from cronium_nb.errors import CroniumError
from cronium_nb.jobs import LoopWork
from cronium_nb.model import Server, Status
from cronium_nb.ssh.pool import ConnectionPool
from cronium_nb.ssh.remote_run import uncancel, uninterrupted
from cronium_nb.store_worker import StoreWorker

__all__ = ["COLUMNS", "DEFAULT_MODE", "Progress", "TransferJob", "Transfers"]

log = logging.getLogger("cronium_nb.transfer")

COLUMNS = ("server", "path", "bytes", "sha256", "status", "error", "duration_s")
CHUNK_BYTES = 1 << 20  # read and written per step, per server: what a transfer holds in memory
DEFAULT_MODE = 0o644  # a new remote file's mode when none is given and no file is replaced
CLEANUP_TIMEOUT_S = 10.0  # one server's cleanup after a failure, timeout or cancel, in all: never a hang
TEMP_SUFFIX = ".part"
_TEMP_STEM_BYTES = 150  # of the destination's name in the temporary name (NAME_MAX is 255)
_SHA256 = re.compile(r"\\?([0-9a-f]{64})\b")

# progress(server, bytes_done, total_bytes or None), on the executor's loop thread, after each piece
Progress = Callable[[str, int, "int | None"], None]
T = TypeVar("T")


class TransferFailed(CroniumError):
    """One server's transfer failed; the message is that server's ``error``."""


@dataclass
class _Row:
    server: str
    path: str
    bytes: int = 0
    sha256: str | None = None
    status: Status = Status.PENDING
    error: str | None = None
    duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS} | {"status": self.status.value}


# -- checks made before anything runs


def check_remote_path(path: object, what: str = "remote path") -> str:
    """A remote path as SFTP and the shell will both take it (``~/x`` becomes ``x``: SFTP and a
    login both start in the home directory)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} must be a non-empty string, got {path!r}")
    if "\0" in path:
        raise ValueError(f"{what} must not contain NUL bytes, got {path!r}")
    if path == "~":
        return "."
    return path[2:] or "." if path.startswith("~/") else path


def check_mode(mode: object) -> int | None:
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be an integer permission from 0 to 0o7777 (e.g. 0o644), got {mode!r}")
    return mode


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def local_name(name: str, what: str) -> str:
    """``name`` when it is safe as one local path component (it cannot leave its directory)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{what} {name!r} cannot be used as a file name under dest: no '/', NUL, '.' or '..'")
    return name


def fetched_name(remote: str) -> str:
    """The local file name a fetch of ``remote`` writes: its basename, refused unless safe."""
    if remote.endswith("/"):
        raise ValueError(f"remote path {remote!r} names a directory; fetch takes one file")
    return local_name(posixpath.basename(remote), "remote file name")


# -- the running transfer


class TransferJob(LoopWork[pd.DataFrame]):
    """A running ``put`` or ``fetch``: a future of its DataFrame. ``cancel()`` stops every
    server's transfer (their temporary files are removed) and returns at once; ``result()``
    then gives the table, the stopped servers' rows ``cancelled``."""


# -- the transfers


@dataclass(frozen=True)
class _Request:
    direction: str  # "put" or "fetch"
    source: str  # put: the local file; fetch: the remote path
    targets: list[Server]
    timeout: float | None
    progress: Progress | None


class Transfers:
    """``put`` and ``fetch`` on the executor's pool (coroutines for its loop)."""

    def __init__(self, pool: ConnectionPool, concurrency: int, store: StoreWorker | None = None) -> None:
        """``store``: where each transfer's rows are recorded (the store's ``transfers``)."""
        self.pool = pool
        self.concurrency = concurrency
        self.store = store

    async def put(
        self,
        targets: list[Server],
        local: Path,
        remote: str,
        mode: int | None,
        timeout: float | None,
        progress: Progress | None,
        size: int | None = None,
    ) -> pd.DataFrame:
        """``size``: the bytes of ``local`` every server gets (its size when the put was asked
        for, so a file still being appended to reaches all alike); None: all of it."""
        request = _Request("put", str(local), targets, timeout, progress)
        return await self._fan_out(
            request,
            lambda server: remote,
            lambda server, row: self._put_one(request, server, row, local, remote, mode, size),
        )

    async def fetch(
        self, targets: list[Server], remote: str, dest: Path, timeout: float | None, progress: Progress | None
    ) -> pd.DataFrame:
        request = _Request("fetch", remote, targets, timeout, progress)
        name = fetched_name(remote)
        return await self._fan_out(
            request,
            lambda server: str(dest / server.name / name),
            lambda server, row: self._fetch_one(request, server, row, remote, dest, name),
        )

    # -- every server at once; each ends as its row

    async def _fan_out(
        self,
        request: _Request,
        path: Callable[[Server], str],
        transfer: Callable[[Server, _Row], Awaitable[None]],
    ) -> pd.DataFrame:
        """Every target's transfer at once (at most ``concurrency``); a cancel stops them all
        and waits for their cleanup, and the table is returned (and recorded) either way."""
        transfer_id, started_at = uuid.uuid4().hex[:12], time.time()
        limit = asyncio.Semaphore(self.concurrency)
        rows = [_Row(server.name, path(server)) for server in request.targets]
        tasks = [
            asyncio.ensure_future(self._one(server, row, transfer, limit, request.timeout))
            for server, row in zip(request.targets, rows, strict=True)
        ]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await uninterrupted(asyncio.wait(tasks))
            uncancel()
        frame = _frame(rows)
        frame.attrs["transfer_id"] = transfer_id
        if self.store is not None:
            records = frame.to_dict("records")
            try:
                store = self.store.store
                await uninterrupted(
                    self.store.call(
                        store.record_transfer, transfer_id, request.direction, request.source, started_at, records
                    )
                )
            except Exception:  # the table is still the caller's; the store says why it failed
                log.exception("recording transfer %s failed", transfer_id)
        return frame

    async def _one(
        self,
        server: Server,
        row: _Row,
        transfer: Callable[[Server, _Row], Awaitable[None]],
        limit: asyncio.Semaphore,
        timeout: float | None,
    ) -> None:
        """One server's transfer, bounded by ``timeout``; whatever happens ends in ``row``."""
        started = time.monotonic()
        try:
            async with limit:
                row.status = Status.RUNNING
                await _within(transfer(server, row), timeout)
            row.status = Status.SUCCESS
        except asyncio.CancelledError:
            uncancel()
            row.status, row.error = Status.CANCELLED, "cancelled"
        except asyncio.TimeoutError:
            row.status, row.error = Status.TIMEOUT, f"the transfer did not finish within {timeout:g} s"
        except CroniumError as error:  # TransferFailed, ConnectError, HostKeyError
            row.status, row.error = Status.FAILED, str(error)
        except (asyncssh.Error, OSError) as error:
            reason = getattr(error, "reason", None) or str(error) or type(error).__name__
            row.status, row.error = Status.FAILED, f"connection to {server.address} failed: {reason}"
        except Exception as error:  # a bug here must not take the other servers down
            log.exception("transfer to %s failed", server.name)
            row.status, row.error = Status.FAILED, f"internal error: {type(error).__name__}: {error}"
        if row.status != Status.SUCCESS:
            row.sha256 = None
        row.duration_s = time.monotonic() - started

    def _report(self, request: _Request, server: str, done: int, total: int | None) -> None:
        if request.progress is None:
            return
        try:
            request.progress(server, done, total)
        except Exception:  # a progress display that breaks must not break the transfer
            log.exception("progress callback failed for %s", server)

    def _lease(self, server: Server, timeout: float | None) -> Any:
        retry_until = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return self.pool.lease(server, retry_until=retry_until)

    # -- put: one server

    async def _put_one(
        self,
        request: _Request,
        server: Server,
        row: _Row,
        local: Path,
        remote: str,
        mode: int | None,
        size: int | None,
    ) -> None:
        async with self._lease(server, request.timeout) as pooled:
            connection = pooled.connection
            cleanup = _Cleanup()
            temp: str | None = None
            try:
                async with _SFTPSession(connection, cleanup) as sftp:
                    dest = await _destination(sftp, remote, local.name)
                    row.path = dest
                    replaced = await _replaced_file(sftp, dest)
                    temp = temp_name(dest)
                    try:
                        handle = await sftp.open(
                            temp,
                            asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_EXCL,
                            asyncssh.SFTPAttrs(permissions=0o600),
                            encoding=None,
                        )
                    except asyncssh.SFTPNoSuchFile:
                        temp = None  # not created: nothing of ours to remove
                        directory = posixpath.dirname(dest) or "the home directory"
                        raise TransferFailed(f"cannot write {dest}: no such directory {directory}") from None
                    except asyncssh.SFTPError as error:
                        temp = None
                        raise TransferFailed(f"cannot write {dest}: {error.reason}") from None
                    async with _closing(handle, cleanup):
                        with _failing_as(f"cannot read {local}", OSError), _failing_as(f"cannot write {dest}"):
                            digest = await _upload(
                                local, handle, size, lambda done: self._report(request, row.server, done, size)
                            )
                            with contextlib.suppress(asyncssh.SFTPOpUnsupported):
                                await handle.fsync()
                            await handle.chmod(_mode_to_give(mode, replaced, await handle.stat()))
                    row.bytes = digest.size
                remote_digest = await _remote_sha256(connection, temp)
                if remote_digest != digest.hex:
                    raise TransferFailed(
                        f"checksum mismatch for {dest}: sent sha256 {digest.hex}, the server has {remote_digest}; "
                        "the destination was left unchanged"
                    )
                async with _SFTPSession(connection, cleanup) as sftp:
                    await _check_still_ours(sftp, temp, dest, digest.size)
                    try:
                        await sftp.posix_rename(temp, dest)
                    except asyncssh.SFTPError as error:
                        raise TransferFailed(f"cannot replace {dest}: {error.reason}") from None
                temp = None
                row.sha256 = digest.hex
            except BaseException:
                if temp is not None:
                    await cleanup.run(_remove_remote(connection, temp, cleanup))
                raise

    # -- fetch: one server

    async def _fetch_one(
        self, request: _Request, server: Server, row: _Row, remote: str, dest: Path, name: str
    ) -> None:
        server_dir = dest / server.name
        final = server_dir / name
        async with self._lease(server, request.timeout) as pooled:
            connection = pooled.connection
            cleanup = _Cleanup()
            partial: Path | None = None
            try:
                async with _SFTPSession(connection, cleanup) as sftp:
                    try:
                        attributes = await sftp.stat(remote)
                        if attributes.permissions is not None and not stat.S_ISREG(attributes.permissions):
                            kind = "a directory" if stat.S_ISDIR(attributes.permissions) else "not a regular file"
                            raise TransferFailed(f"cannot read {remote}: it is {kind}")
                        handle = await sftp.open(remote, "rb", encoding=None)
                    except asyncssh.SFTPError as error:
                        raise TransferFailed(f"cannot read {remote}: {error.reason}") from None
                    async with _closing(handle, cleanup):
                        opened = await handle.stat()  # what was opened, not what the name led to before
                        if opened.permissions is not None and not stat.S_ISREG(opened.permissions):
                            raise TransferFailed(f"cannot read {remote}: it is not a regular file (it was replaced)")
                        # as opened: what we copy, however it grows; 0 is a /proc or /sys file,
                        # whose size is only known by reading it to its end
                        size = opened.size or None
                        with _failing_as(f"cannot write {final}", OSError):
                            # created here, not in a thread: a cancel cannot strand it unnamed
                            descriptor, received = _private_partial(dest, server_dir, name)
                        partial = received
                        with _failing_as(f"cannot write {final}", OSError), _failing_as(f"cannot read {remote}"):
                            written = await _download(
                                handle, descriptor, size, lambda done: self._report(request, row.server, done, size)
                            )
                    digest = written.digest
                    if size is not None and digest.size < size:
                        raise TransferFailed(
                            f"cannot read {remote}: it shrank while it was read ({digest.size} of {size} bytes)"
                        )
                    row.bytes = digest.size
                remote_digest = await _remote_sha256(connection, remote, limit=digest.size)
                if remote_digest != digest.hex:
                    raise TransferFailed(
                        f"checksum mismatch for {remote}: received sha256 {digest.hex}, the server has {remote_digest} "
                        "for the same bytes (did the file change while it was read?)"
                    )
                with _failing_as(f"cannot write {final}", OSError):
                    if not os.path.samestat(written.file, os.lstat(received)):
                        raise TransferFailed(
                            f"cannot write {final}: its temporary file {received} was replaced by someone else "
                            "while it was written; nothing was renamed"
                        )
                    os.replace(received, final)
                partial = None
                row.sha256 = digest.hex
            finally:
                if partial is not None:
                    with contextlib.suppress(OSError):
                        partial.unlink()


# -- pieces


def _frame(rows: list[_Row]) -> pd.DataFrame:
    """The result table; text columns keep None (not NaN) where there is no value."""
    records = [row.as_dict() for row in rows]
    numeric = {"bytes": "int64", "duration_s": "float64"}
    return pd.DataFrame(
        {name: pd.Series([r[name] for r in records], dtype=numeric.get(name, object)) for name in COLUMNS}
    )


@dataclass(frozen=True)
class _Digest:
    hex: str
    size: int


@contextlib.contextmanager
def _failing_as(what: str, *errors: type[Exception]) -> Iterator[None]:
    """``errors`` (default: an SFTP request the server failed) raised inside become this
    server's failure ``what: reason``: a full local disk or a read error on the server is no
    "connection failed". A lost connection stays one."""
    caught = errors or (asyncssh.SFTPError,)
    try:
        yield
    except caught as error:
        if isinstance(error, (asyncssh.SFTPNoConnection, asyncssh.SFTPConnectionLost)):
            raise
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
        raise TransferFailed(f"{what}: {reason}") from None


async def _within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``awaitable``, raising TimeoutError (and cancelling it) after ``timeout`` seconds."""
    if timeout is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        # wait_for can return a result that lands with a cancel, swallowing it (3.11)
        async with asyncio.timeout(timeout):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout)


class _Cleanup:
    """One server's cleanup after a failure, timeout or cancel (closing the remote file and the
    SFTP session, removing the temporary file): best effort, and ``CLEANUP_TIMEOUT_S`` for all
    its steps together, so a server that stopped answering does not hold the transfer past its
    timeout until the keepalive gives up on the connection."""

    def __init__(self) -> None:
        self._deadline: float | None = None  # set by the first step

    async def run(self, step: Awaitable[object]) -> None:
        """Await ``step`` within what is left of the budget; its errors are dropped (the
        transfer's own error is the one that counts)."""
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + CLEANUP_TIMEOUT_S
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(step, max(0.0, self._deadline - loop.time()))


@contextlib.asynccontextmanager
async def _closing(handle: asyncssh.SFTPClientFile, cleanup: _Cleanup) -> AsyncIterator[asyncssh.SFTPClientFile]:
    """``handle``, closed on leaving; after a failure the close is a step of ``cleanup``."""
    try:
        yield handle
    except BaseException:
        await cleanup.run(handle.close())
        raise
    await handle.close()


class _SFTPSession:
    """An SFTP session on ``connection`` (one channel), closed on leaving (after a failure, as a
    step of ``cleanup``); a server that refuses the subsystem is this server's clear failure."""

    def __init__(self, connection: asyncssh.SSHClientConnection, cleanup: _Cleanup) -> None:
        self.connection = connection
        self.cleanup = cleanup
        self.client: asyncssh.SFTPClient | None = None

    async def __aenter__(self) -> asyncssh.SFTPClient:
        try:
            self.client = await self.connection.start_sftp_client()
        except asyncssh.ChannelOpenError as error:
            if error.code != asyncssh.OPEN_REQUEST_SESSION_FAILED:
                raise
            raise TransferFailed(
                f"the server refused SFTP ({error.reason}): its sshd needs a 'Subsystem sftp' line"
            ) from None
        return self.client

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self.client is not None:
            self.client.exit()
            if exc_type is None:
                await self.client.wait_closed()
            else:
                await self.cleanup.run(self.client.wait_closed())


async def _destination(sftp: asyncssh.SFTPClient, remote: str, name: str) -> str:
    """Where a put of the local file ``name`` to ``remote`` writes: ``remote``, or ``name`` in it
    when it is a directory. A link there is followed only when the path ends in ``/``."""
    if remote.endswith("/"):
        return posixpath.join(remote, name)
    try:
        attributes = await sftp.lstat(remote)
    except asyncssh.SFTPError:
        return remote  # nothing there yet (or not ours to see): the open says which
    kind = attributes.permissions or 0
    if stat.S_ISDIR(kind):
        return posixpath.join(remote, name)
    if stat.S_ISLNK(kind) and await sftp.isdir(remote):
        raise TransferFailed(
            f"cannot write {remote}: it is a symbolic link to a directory; "
            "end the path with '/' to put the file into the directory it points to"
        )
    return remote


async def _replaced_file(sftp: asyncssh.SFTPClient, path: str) -> asyncssh.SFTPAttrs | None:
    """The attributes of the regular file at ``path`` itself (a link is not followed: it is
    replaced, and lends nothing); None when there is none."""
    try:
        attributes = await sftp.lstat(path)
    except asyncssh.SFTPError:
        return None
    if attributes.permissions is None or not stat.S_ISREG(attributes.permissions):
        return None
    return attributes


def _mode_to_give(mode: int | None, replaced: asyncssh.SFTPAttrs | None, created: asyncssh.SFTPAttrs) -> int:
    """The caller's ``mode``, else the replaced file's permissions, else the default. The
    replaced file's setuid (setgid) bit is kept only when the new file has its owner (group)."""
    if mode is not None:
        return mode
    if replaced is None or replaced.permissions is None:
        return DEFAULT_MODE
    kept = replaced.permissions & 0o1777
    if replaced.uid is not None and replaced.uid == created.uid:
        kept |= replaced.permissions & stat.S_ISUID
    if replaced.gid is not None and replaced.gid == created.gid:
        kept |= replaced.permissions & stat.S_ISGID
    return kept


async def _check_still_ours(sftp: asyncssh.SFTPClient, temp: str, dest: str, size: int) -> None:
    """Refuse to rename ``temp`` unless it is still a regular file of the ``size`` we wrote:
    in a directory others can write in, it may have been swapped for a link meanwhile."""
    try:
        attributes = await sftp.lstat(temp)
    except asyncssh.SFTPError as error:
        raise TransferFailed(f"cannot replace {dest}: its temporary file {temp}: {error.reason}") from None
    kind = attributes.permissions or 0
    if stat.S_ISLNK(kind):
        now = "a symbolic link"
    elif not stat.S_ISREG(kind):
        now = "not a regular file"
    elif attributes.size != size:
        now = f"{attributes.size} bytes, not {size}"
    else:
        return
    raise TransferFailed(
        f"cannot replace {dest}: its temporary file {temp} was replaced by someone else (now {now}); "
        "the destination was left unchanged"
    )


def temp_name(dest: str) -> str:
    """A fresh hidden name next to ``dest`` (same directory: the rename stays atomic)."""
    stem = posixpath.basename(dest).encode()[:_TEMP_STEM_BYTES].decode(errors="ignore")
    return posixpath.join(posixpath.dirname(dest), f".{stem}.cronium-{secrets.token_hex(8)}{TEMP_SUFFIX}")


def _read_and_hash(source: IO[bytes], hasher: Any, wanted: int) -> bytes:
    data = source.read(wanted)
    hasher.update(data)
    return data


async def _upload(
    local: Path, handle: asyncssh.SFTPClientFile, size: int | None, done: Callable[[int], None]
) -> _Digest:
    """Copy the first ``size`` bytes of ``local`` (all of it when None) into the open remote
    file piece by piece, hashing as they are read."""
    hasher, offset = hashlib.sha256(), 0
    with open(local, "rb") as source:
        while size is None or offset < size:
            wanted = CHUNK_BYTES if size is None else min(CHUNK_BYTES, size - offset)
            data = await asyncio.to_thread(_read_and_hash, source, hasher, wanted)
            if not data:
                break
            await handle.write(data, offset)
            offset += len(data)
            done(offset)
    if size is not None and offset < size:
        raise TransferFailed(f"cannot read {local}: it shrank while it was read ({offset} of {size} bytes)")
    return _Digest(hasher.hexdigest(), offset)


def _private_partial(dest: Path, server_dir: Path, name: str) -> tuple[int, Path]:
    """A new 0600 file next to where ``name`` goes, after checking that place is inside ``dest``:
    its open descriptor (write through it: the name may be swapped by whoever can write there)
    and its path."""
    server_dir.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    if os.path.commonpath([root, os.path.realpath(server_dir)]) != root:
        raise TransferFailed(f"{server_dir} leads outside {dest} (a symbolic link?): refused")
    descriptor, path = tempfile.mkstemp(prefix=f".{name[:_TEMP_STEM_BYTES]}.", suffix=TEMP_SUFFIX, dir=server_dir)
    return descriptor, Path(path)


def _write_and_hash(target: IO[bytes], hasher: Any, data: bytes) -> None:
    hasher.update(data)
    target.write(data)


@dataclass(frozen=True)
class _Written:
    digest: _Digest
    file: os.stat_result  # of the file written: its name must still lead to it at the rename


async def _download(
    handle: asyncssh.SFTPClientFile, descriptor: int, size: int | None, done: Callable[[int], None]
) -> _Written:
    """Copy the open remote file into the local file open as ``descriptor`` (closed on return)
    piece by piece, hashing as it arrives: its first ``size`` bytes (all of it when None)."""
    hasher, offset = hashlib.sha256(), 0
    with open(descriptor, "wb") as target:
        while size is None or offset < size:
            wanted = CHUNK_BYTES if size is None else min(CHUNK_BYTES, size - offset)
            data = cast(bytes, await handle.read(wanted, offset))  # opened without encoding
            if not data:
                break
            await asyncio.to_thread(_write_and_hash, target, hasher, data)
            offset += len(data)
            done(offset)
        await asyncio.to_thread(os.fsync, target.fileno())
        return _Written(_Digest(hasher.hexdigest(), offset), os.fstat(target.fileno()))


async def _remote_sha256(connection: asyncssh.SSHClientConnection, path: str, limit: int | None = None) -> str:
    """The SHA-256 of ``path`` (of its first ``limit`` bytes) computed on the server."""
    quoted = shlex.quote(path)
    script = f"head -c {int(limit)} < {quoted} | sha256sum" if limit is not None else f"sha256sum < {quoted}"
    result = await connection.run("sh -c " + shlex.quote(script), check=False, encoding="utf-8", errors="replace")
    match = _SHA256.match(str(result.stdout or ""))
    if result.exit_status != 0 or match is None:
        said = str(result.stderr or "").strip() or f"exit status {result.exit_status}"
        raise TransferFailed(f"cannot checksum {path} on the server (sha256sum): {said}")
    return match.group(1)


async def _remove_remote(connection: asyncssh.SSHClientConnection, path: str, cleanup: _Cleanup) -> None:
    """Remove ``path`` (a step of ``cleanup``: the connection may be why we are cleaning up)."""
    async with _SFTPSession(connection, cleanup) as sftp:
        await sftp.remove(path)


# -- starting one (the executor's entry points check everything here, before anything runs)


def start_put(
    transfers: Transfers,
    loop: asyncio.AbstractEventLoop,
    targets: list[Server],
    local: str | os.PathLike[str],
    remote: str,
    *,
    mode: int | None,
    timeout: float | None,
    progress: Progress | None,
) -> TransferJob:
    """Check a put's arguments and start it on ``loop``; bad input raises here."""
    source = Path(os.path.expanduser(os.fspath(local)))
    if not source.exists():
        raise FileNotFoundError(f"local file {source} does not exist")
    if not source.is_file():
        raise ValueError(f"local path {source} is not a regular file; put copies one file")
    remote = check_remote_path(remote)
    size = source.stat().st_size or None  # 0: a /proc file, known only by reading it to its end
    coroutine = transfers.put(
        targets, source, remote, check_mode(mode), check_timeout(timeout), _check_progress(progress), size
    )
    return TransferJob(loop, coroutine)


def start_fetch(
    transfers: Transfers,
    loop: asyncio.AbstractEventLoop,
    targets: list[Server],
    remote: str,
    *,
    dest: str | os.PathLike[str],
    timeout: float | None,
    progress: Progress | None,
) -> TransferJob:
    """Check a fetch's arguments and start it on ``loop``; bad input raises here."""
    remote = check_remote_path(remote)
    fetched_name(remote)
    for server in targets:
        local_name(server.name, "server name")
    root = Path(os.path.expanduser(os.fspath(dest))).absolute()
    if root.exists() and not root.is_dir():
        raise ValueError(f"dest {root} exists and is not a directory")
    coroutine = transfers.fetch(targets, remote, root, check_timeout(timeout), _check_progress(progress))
    return TransferJob(loop, coroutine)


def _check_progress(progress: Progress | None) -> Progress | None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable as progress(server, bytes_done, total_bytes), got {progress!r}")
    return progress
