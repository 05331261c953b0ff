"""The targets of several full `make bench` runs side by side: each run's result and whether it
was met, and whether it was met in every run (issue 20 asks for the spread over three runs).

Usage: python benchmarks/spread.py RUN_DIR [RUN_DIR ...]   (each holds a RESULTS.md written by
`bench.py --out RUN_DIR`); prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path


def targets(results: Path) -> dict[str, tuple[str, bool]]:
    """target -> (result, met) from the ``## Targets`` table of one RESULTS.md (a B2 result is
    its verdict: the peers that beat us, and where)."""
    rows: dict[str, tuple[str, bool]] = {}
    in_table = False
    for line in results.read_text().splitlines():
        if line.startswith("## "):
            in_table = line == "## Targets"
            continue
        if not in_table or not line.startswith("| ") or line.startswith(("| target", "|---")):
            continue
        target, result, met = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        if result == "see B2":
            result = "faster than all" if met == "yes" else "behind " + met.partition(": ")[2]
        rows[target] = (result, met == "yes")
    return rows


def main(run_dirs: list[str]) -> None:
    runs = [targets(Path(d) / "RESULTS.md") for d in run_dirs]
    names = list(dict.fromkeys(name for run in runs for name in run))
    header = ["target", *(f"run {i + 1}" for i in range(len(runs))), "met in every run"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in names:
        cells = [run.get(name, ("(not run)", False)) for run in runs]
        shown = [f"{result} ({'met' if met else 'not met'})" for result, met in cells]
        verdict = "yes" if all(met for _, met in cells) else "**no**"
        print(f"| {name} | " + " | ".join(shown) + f" | {verdict} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
