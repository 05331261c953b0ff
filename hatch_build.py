"""Build hook: puts the runner builds and the example notebooks into the wheel (and the sdist).

The wheel gets ``runner/dist`` as ``cronium_nb/_runner/`` (each binary that ``runner.json``
lists, its ``.sha256`` and ``runner.json``) and ``notebooks/*.ipynb`` as
``cronium_nb/_examples/``; :mod:`cronium_nb.resources` finds them there. The sdist gets the same
runner files at ``runner/dist/``, so a wheel built from it is complete too. Nothing is added to
an editable install: it finds both in the checkout.

A wheel without the runner could deploy nothing, so the build stops when ``runner/dist`` is
missing, incomplete or does not match its ``runner.json`` (run ``make runner`` first).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

RUNNER_DIST = Path("runner") / "dist"
RUNNER_INFO = "runner.json"
WHEEL_RUNNER = "cronium_nb/_runner"
WHEEL_EXAMPLES = "cronium_nb/_examples"


def runner_files(root: Path) -> list[Path]:
    """``runner.json`` and every binary it lists with its ``.sha256``, each checked."""
    dist = root / RUNNER_DIST
    info_path = dist / RUNNER_INFO
    if not info_path.is_file():
        raise RuntimeError(f"no runner builds in {dist}: run `make runner` before building the package")
    binaries = json.loads(info_path.read_text())["binaries"]
    files = [info_path]
    for arch, sha256 in sorted(binaries.items()):
        binary = dist / f"cronium-runner-linux-{arch}"
        checksum = binary.with_name(binary.name + ".sha256")
        if not binary.is_file() or not checksum.is_file():
            raise RuntimeError(f"{binary} or its .sha256 is missing: run `make runner`")
        if hashlib.sha256(binary.read_bytes()).hexdigest() != sha256:
            raise RuntimeError(f"{binary} does not match {info_path}: run `make runner`")
        files += [binary, checksum]
    return files


class RunnerDataHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        force_include = build_data["force_include"]
        if self.target_name == "wheel":
            for path in runner_files(root):
                force_include[str(path)] = f"{WHEEL_RUNNER}/{path.name}"
            for notebook in sorted((root / "notebooks").glob("*.ipynb")):
                force_include[str(notebook)] = f"{WHEEL_EXAMPLES}/{notebook.name}"
        elif self.target_name == "sdist":
            for path in runner_files(root):
                force_include[str(path)] = str(RUNNER_DIST / path.name)
