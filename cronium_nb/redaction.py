"""Secret redaction: an event's secret values never reach the store, the live view or a result.

A single-line secret is replaced wherever it appears; a multi-line one (a PEM or SSH private
key) by each of its non-trivial lines, so that the line count of the output stays right and a
script that prints the key line by line shows none of it. The replacement works on text, on
bytes (output as it streams, see ``LineSplitter`` of the protocol codec) and on JSON values
(outputs and variables: every string in them, keys included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
# Lines of a multi-line secret shorter than this ("}", "", a short header) would blank out
# ordinary output without protecting anything.
MIN_SECRET_LINE = 6


class Redactor:
    """Replaces the given secret values by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        needles: set[str] = set()
        for value in secrets:
            if not value:
                continue
            lines = [line.strip() for line in value.splitlines() if line.strip()]
            if len(lines) > 1:
                needles.update(line for line in lines if len(line) >= MIN_SECRET_LINE)
            else:  # one line, perhaps read from a file with its newline
                needles.update({value, *lines})
        ordered = sorted(needles, key=len, reverse=True)  # the longest first, where one holds another
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = re.compile(b"|".join(re.escape(n.encode()) for n in ordered)) if ordered else None
        # Bytes of a secret that may still be on the way when a long line is cut into pieces.
        self.longest = max((len(n.encode()) for n in ordered), default=0)

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, text: str) -> str:
        return self._text.sub(REDACTED, text) if self._text is not None else text

    def data(self, data: bytes) -> bytes:
        return self._bytes.sub(REDACTED.encode(), data) if self._bytes is not None else data

    def value(self, value: Any) -> Any:
        """A JSON value with every string in it redacted."""
        if self._text is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        return value
