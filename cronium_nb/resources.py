"""Files that come with the package, wherever it is installed, and the ``cronium-runner`` command.

Owns where the runner builds and the example notebooks are found:

- an installed wheel carries them as package data: ``cronium_nb/_runner/`` (each
  ``cronium-runner-linux-<arch>``, its ``.sha256`` and ``runner.json``) and
  ``cronium_nb/_examples/*.ipynb`` (put there by ``hatch_build.py``);
- a checkout (development, an editable install) has neither, and uses ``runner/dist`` (built by
  ``make runner``) and ``notebooks/`` next to the package.

``cronium-runner ARGS`` (a console script) runs this machine's runner build with ``ARGS``, e.g.
``cronium-runner version``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn

RUNNER_DATA = "_runner"
EXAMPLES_DATA = "_examples"
RUNNER_INFO = "runner.json"
_CHECKOUT = Path(__file__).resolve().parent.parent


def _package_data(name: str) -> Path | None:
    """The package-data directory ``name`` when this package was installed with it."""
    directory = resources.files("cronium_nb").joinpath(name)
    # A wheel installs into a directory, so this is a real path; a zipped package is not supported.
    if isinstance(directory, Path) and directory.is_dir():
        return directory
    return None


def runner_dist() -> Path:
    """The directory of runner builds: the package's own, else the checkout's ``runner/dist``.

    The checkout's may not exist yet (``make runner`` builds it); deploying then fails with an
    error that says so.
    """
    return _package_data(RUNNER_DATA) or _CHECKOUT / "runner" / "dist"


def notebooks_dir() -> Path:
    """The example notebooks: the package's own, else the checkout's ``notebooks/``."""
    return _package_data(EXAMPLES_DATA) or _CHECKOUT / "notebooks"


def runner_binary(machine: str | None = None) -> Path:
    """The runner build for a ``uname -m`` machine name (this machine's by default)."""
    from cronium_nb.ssh.deploy import MACHINE_ARCH

    machine = machine or platform.machine()
    arch = MACHINE_ARCH.get(machine)
    dist = runner_dist()
    if arch is None:
        raise FileNotFoundError(f"no runner for architecture {machine}: known are {', '.join(sorted(MACHINE_ARCH))}")
    binary = dist / f"cronium-runner-linux-{arch}"
    if not binary.is_file():
        raise FileNotFoundError(f"no runner build for linux/{arch} in {dist} (in a checkout: `make runner`)")
    return binary


def main_runner(argv: Sequence[str] | None = None) -> NoReturn:
    """``cronium-runner``: replace this process with the local runner build, passing the arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not sys.platform.startswith("linux"):
        sys.exit(f"cronium-runner: the runner is a Linux program; this is {sys.platform}")
    try:
        binary = runner_binary()
    except FileNotFoundError as error:
        sys.exit(f"cronium-runner: {error}")
    os.execv(binary, [str(binary), *args])
