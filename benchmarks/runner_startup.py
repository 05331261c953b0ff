"""Runner start-up on this machine: `version`, and a whole framed run of a `true` script.

Usage: python benchmarks/runner_startup.py [RUNS]   (needs `make runner`; prints medians)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

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
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(DIST / "cronium-runner-linux-amd64.tar.gz") as bundle:
            bundle.extractall(folder, filter="tar")
        flavours = {
            "bundle": [f"{folder}/cronium-runner/cronium-runner"],
            "zipapp": [sys.executable, str(DIST / "cronium-runner.pyz")],
        }
        workroot = ["--workroot", f"{folder}/runs"]
        for flavour, runner in flavours.items():
            version = median_ms([*runner, "version"], runs)
            run = median_ms([*runner, "run", "-", "--framed", *workroot], runs, stdin)
            print(f"{flavour:7s} version {version:6.1f} ms   run of `true` {run:6.1f} ms   (median of {runs})")
    sizes = {p.name: p.stat().st_size for p in sorted(DIST.glob("*.tar.gz"))} | {
        "cronium-runner.pyz": (DIST / "cronium-runner.pyz").stat().st_size
    }
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
