"""The orchestrator's line splitting: line by line and block by block give the same lines."""

from __future__ import annotations

import random

import pytest

from cronium_nb.protocol import LineSplitter


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
