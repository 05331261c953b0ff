"""Write 1,000,000 log lines (two servers, one line per read) through LogBuffer and read them back as a DataFrame.

Usage: python benchmarks/store_logs.py [LINES]
Prints write time, read time and the process's peak RSS (this runs in its own process, so the
peak is the store's and pandas', not a test runner's).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time

from cronium_nb.store import LogBuffer, Store


def main(lines: int = 1_000_000) -> None:
    with tempfile.TemporaryDirectory() as directory, Store(directory) as store:
        store.start_execution("bench", "bench", ["a", "b"])
        started = time.perf_counter()
        buffer = LogBuffer(store, batch_size=10_000)
        for number in range(lines):  # two servers' lines interleaved, 1 ms apart, each one a read
            seq = number // 2 + 1
            buffer.add(
                "bench", "ab"[number % 2], seq, 1.7e9 + number / 1000, "stdout", f"line {seq:07d} of the benchmark"
            )
        buffer.flush()
        written = time.perf_counter() - started
        started = time.perf_counter()
        frame = store.logs("bench")
        read = time.perf_counter() - started
        assert len(frame) == lines
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{lines} log lines: write {written:.2f} s ({lines / written:,.0f} lines/s), "
          f"read as DataFrame {read:.2f} s, peak RSS {peak_mb:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
