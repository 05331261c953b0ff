"""Runner start-up on this machine: `version`, and a whole framed run of a `true` script, with
the static Go binary for this machine's architecture; and each binary's size, gzip-compressed
as it goes on the wire.

Usage: python benchmarks/runner_startup.py [RUNS]   (needs `make runner`; prints medians)
"""

from __future__ import annotations

import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cronium_nb.fleet import HOST_ARCH
from cronium_nb.manifest import Manifest
from cronium_nb.payload import build_archive

DIST = Path(__file__).resolve().parent.parent / "runner" / "dist"


def median_ms(command: list[str], runs: int, stdin: bytes = b"") -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, input=stdin, capture_output=True, check=False)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main(runs: int = 20) -> None:
    archive = build_archive(Manifest(name="true", type="sh", entrypoint="script.sh"), "true\n")
    stdin = json.dumps({"payload_size": archive.size}).encode() + b"\n" + archive.data
    runner = [str(DIST / f"cronium-runner-linux-{HOST_ARCH}")]
    with tempfile.TemporaryDirectory() as folder:
        version = median_ms([*runner, "version"], runs)
        run = median_ms([*runner, "run", "-", "--framed", "--workroot", f"{folder}/runs"], runs, stdin)
    print(f"linux/{HOST_ARCH}: version {version:.1f} ms, run of `true` {run:.1f} ms (median of {runs})")
    for binary in sorted(p for p in DIST.glob("cronium-runner-linux-*") if p.suffix != ".sha256"):
        data = binary.read_bytes()
        packed = len(gzip.compress(data, compresslevel=6, mtime=0))
        print(f"{binary.name}: {len(data) / 1e6:.2f} MB, {packed / 1e6:.2f} MB gzip-compressed (as deployed)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
