"""The orchestrator's codec of the runner's wire protocol (``runner/PROTOCOL.md`` is the one
written source of truth; the Go runner implements the other side).

The runner's stdout carries only frames, so script output of any content (binary bytes, a line
of megabytes, text that looks like a frame) cannot be confused with the runner's own messages::

    MAGIC                       once, first
    kind:1  ts:float64  len:uint32  payload:len     repeated (big-endian)

``kind`` is ``O`` (script stdout bytes), ``E`` (script stderr bytes) or ``M`` (a JSON message:
``hello``, ``started``, ``result``...). ``ts`` is the Unix time at which the runner read the
bytes. The orchestrator splits stdout/stderr into lines itself (:class:`LineSplitter`).

The orchestrator's stdin to the runner carries one JSON line of run context first (and, when
the payload path is ``-``, ``payload_size`` bytes of payload right after it), then JSON control
lines such as ``{"op": "stop", "reason": "cancel"}``. End of stdin means the orchestrator is
gone: the runner stops the script. The runner's own exit codes are :class:`RunnerExit`.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cronium_nb.errors import CroniumError, ErrorKind

MAGIC = b"CRONIUM-RUNNER/2\n"
HEADER = struct.Struct(">cdI")
STDOUT, STDERR, MESSAGE = b"O", b"E", b"M"
KINDS = (STDOUT, STDERR, MESSAGE)
MAX_FRAME = 16 * 1024 * 1024  # far above what the runner sends (64 KiB reads); more means corruption
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}


class RunnerExit(IntEnum):
    USAGE = 64  # bad command line, or a helper called wrongly
    BAD_PAYLOAD = 65  # not a gzip tar, an unsafe member, a missing manifest or entrypoint
    NO_PAYLOAD = 66  # payload file missing or stdin ended early
    CHECKSUM_MISMATCH = 67  # payload SHA-256 differs from --sha256: nothing was extracted or run
    BAD_MANIFEST = 68  # manifest.yaml does not match the schema
    INTERPRETER_MISSING = 69  # bash/sh/python3/node not found on the server
    INTERNAL = 70  # a bug in the runner
    WORKDIR = 73  # the private work dir could not be created or is unsafe
    BECOME = 74  # become: sudo is missing, or refused to run the script as the user

    @property
    def slug(self) -> str:
        return self.name.lower()


def encode(kind: bytes, ts: float, payload: bytes) -> bytes:
    return HEADER.pack(kind, ts, len(payload)) + payload


def encode_message(ts: float, message: dict[str, Any]) -> bytes:
    return encode(MESSAGE, ts, json.dumps(message, separators=(",", ":")).encode())


class ProtocolError(CroniumError, ValueError):
    """The byte stream is not a valid frame stream."""

    error_kind: ErrorKind = "runner"


@dataclass(frozen=True)
class Frame:
    kind: bytes
    ts: float
    payload: bytes

    def message(self) -> dict[str, Any]:
        return json.loads(self.payload)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get the complete frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._seen_magic = False

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        if not self._seen_magic:
            if len(self._buffer) < len(MAGIC):
                if not MAGIC.startswith(bytes(self._buffer)):
                    raise ProtocolError(f"not a runner stream: {bytes(self._buffer[:80])!r}")
                return []
            if not self._buffer.startswith(MAGIC):
                raise ProtocolError(f"not a runner stream: {bytes(self._buffer[:80])!r}")
            del self._buffer[: len(MAGIC)]
            self._seen_magic = True
        frames = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            kind, ts, length = HEADER.unpack_from(self._buffer, offset)
            if kind not in KINDS or length > MAX_FRAME:
                raise ProtocolError(f"corrupt frame header (kind {kind!r}, length {length})")
            end = offset + HEADER.size + length
            if end > len(self._buffer):
                break
            frames.append(Frame(kind, ts, bytes(self._buffer[offset + HEADER.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


def coalesced(frames: list[Frame]) -> list[Frame]:
    """``frames`` with each run of consecutive output frames of one stream joined into one (the
    first one's ``ts``). A script's output can reach us in many frames of a few KiB (the runner
    sends what it gathered within 1 ms of a read); handling a read's worth of them at once keeps
    the per-frame work (line splitting, decoding, storing) from bounding the throughput
    (benchmarks/analysis.md, B4)."""
    joined: list[Frame] = []
    for kind, group in itertools.groupby(frames, key=lambda frame: frame.kind):
        run = list(group)
        if kind == MESSAGE or len(run) == 1:
            joined.extend(run)
        else:
            joined.append(Frame(kind, run[0].ts, b"".join(frame.payload for frame in run)))
    return joined


class LineSplitter:
    """Splits one stream's chunks into lines (``\\n`` removed), bounding memory.

    A line longer than ``max_line`` is emitted in pieces of ``max_line`` bytes, so nothing is
    lost or held forever. ``bytes.split`` does the work: Python-level work is per chunk, not
    per line, which is what keeps 100 MB/s of short lines affordable.

    ``redact`` (bytes -> bytes) is applied to everything emitted, and to a long line *before* it
    is cut, keeping ``hold_back`` bytes of an unfinished line back, so that no secret is ever
    split between two pieces where a line-by-line replacement could not see it.
    """

    def __init__(
        self, max_line: int = 1024 * 1024, redact: Callable[[bytes], bytes] | None = None, hold_back: int = 0
    ) -> None:
        self.max_line = max_line
        self._redact = redact
        self._hold_back = hold_back if redact is not None else 0
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" in data:
            lines = data.split(b"\n")
            if self._partial:
                lines[0] = bytes(self._partial) + lines[0]
            self._partial = bytearray(lines.pop())
            if self._redact is not None:
                lines = [self._redact(line) for line in lines]
            if max(map(len, lines)) > self.max_line:
                lines = [piece for line in lines for piece in self._chop(line)]
        else:
            lines = []
            self._partial += data
        if len(self._partial) > self.max_line + self._hold_back:
            if self._redact is not None:
                self._partial = bytearray(self._redact(bytes(self._partial)))
            while len(self._partial) > self.max_line + self._hold_back:
                lines.append(bytes(self._partial[: self.max_line]))
                del self._partial[: self.max_line]
        return lines

    def feed_block(self, data: bytes) -> tuple[bytes, int]:
        """Like :meth:`feed`, but the lines come back joined by ``\\n`` with their count: for a
        chunk of short lines nothing is split at all (the storage keeps blocks of lines)."""
        end = data.rfind(b"\n")
        if end < 0 or len(self._partial) + end > self.max_line:
            lines = self.feed(data)  # no complete line, or a line may be too long: the careful way
            return b"\n".join(lines), len(lines)
        block = bytes(self._partial) + data[:end] if self._partial else data[:end]
        self._partial = bytearray(data[end + 1 :])
        if self._redact is not None:
            block = self._redact(block)
        return block, block.count(b"\n") + 1

    def flush(self) -> list[bytes]:
        """The unterminated rest, at end of stream."""
        rest, self._partial = bytes(self._partial), bytearray()
        if self._redact is not None:
            rest = self._redact(rest)
        return self._chop(rest) if rest else []

    def _chop(self, line: bytes) -> list[bytes]:
        if len(line) <= self.max_line:
            return [line]
        return [line[i : i + self.max_line] for i in range(0, len(line), self.max_line)]
