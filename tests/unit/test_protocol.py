"""The orchestrator's frame handling and line splitting: frames of one stream joined in order,
line by line and block by block give the same lines."""

from __future__ import annotations

import itertools
import random

import pytest

from cronium_nb.protocol import (
    MAGIC,
    MESSAGE,
    STDERR,
    STDOUT,
    Frame,
    FrameDecoder,
    LineSplitter,
    coalesced,
    encode,
    encode_message,
)


def pieces_of(rng: random.Random) -> list[bytes]:
    data = b"".join(rng.choice([b"a", b"bb", b"\n", b"ccc\n", b"x" * 30, b"\xff\n"]) for _ in range(rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 5))))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("seed", range(5))
def test_blocks_hold_the_same_lines_as_line_by_line(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        pieces = pieces_of(rng)
        by_line, by_block = LineSplitter(max_line=16), LineSplitter(max_line=16)
        expected = [line for piece in pieces for line in by_line.feed(piece)] + by_line.flush()
        got: list[bytes] = []
        for piece in pieces:
            block, count = by_block.feed_block(piece)
            if count:
                got += block.split(b"\n")
                assert len(block.split(b"\n")) == count
        got += by_block.flush()
        assert got == expected, pieces
        assert all(len(line) <= 16 for line in got)


def test_a_long_line_is_cut_into_bounded_pieces() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed_block(b"abcdefghij\nxy") == (b"abcd\nefgh\nij", 3)
    assert splitter.flush() == [b"xy"]


def test_consecutive_output_frames_of_one_stream_are_joined_in_order() -> None:
    frames = [
        Frame(STDOUT, 1.0, b"a\n"),
        Frame(STDOUT, 1.1, b"b"),
        Frame(STDOUT, 1.2, b"c\n"),
        Frame(STDERR, 1.3, b"oops\n"),
        Frame(STDOUT, 1.4, b"d\n"),
        Frame(MESSAGE, 1.5, b'{"type": "started"}'),
        Frame(MESSAGE, 1.6, b'{"type": "result"}'),
        Frame(STDOUT, 1.7, b"e\n"),
    ]
    assert coalesced(frames) == [
        Frame(STDOUT, 1.0, b"a\nbc\n"),
        Frame(STDERR, 1.3, b"oops\n"),
        Frame(STDOUT, 1.4, b"d\n"),
        Frame(MESSAGE, 1.5, b'{"type": "started"}'),
        Frame(MESSAGE, 1.6, b'{"type": "result"}'),
        Frame(STDOUT, 1.7, b"e\n"),
    ]


def test_joined_frames_give_the_same_lines_as_the_frames_one_by_one() -> None:
    rng = random.Random(7)
    for _ in range(200):
        pieces = pieces_of(rng)
        stream = b"".join(encode(rng.choice([STDOUT, STDERR]), 2.0, piece) for piece in pieces)
        stream += encode_message(3.0, {"type": "result"})
        decoded = FrameDecoder().feed(MAGIC + stream)
        joined = coalesced(decoded)
        for kind in (STDOUT, STDERR):
            assert b"".join(f.payload for f in joined if f.kind == kind) == b"".join(
                f.payload for f in decoded if f.kind == kind
            )
        assert [f.kind for f in joined].count(MESSAGE) == 1
        assert all(a.kind != b.kind or a.kind == MESSAGE for a, b in itertools.pairwise(joined))
