"""``make demo``: execute notebooks/01-quickstart.ipynb headless — a real run on a local
amd64 + arm64 fleet — and print what its cells printed, the result DataFrames among them."""

from __future__ import annotations

import sys

from cronium_nb.notebooks import NOTEBOOKS, execute, text_outputs


def main() -> None:
    path = NOTEBOOKS / "01-quickstart.ipynb"
    print(f"executing {path.name} (starts 1 x linux/amd64 and 1 x linux/arm64 sshd container) ...", flush=True)
    notebook = execute(path)
    for text in text_outputs(notebook):
        print(text.rstrip("\n"), end="\n\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
