"""Where cronium_nb keeps its state."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "CRONIUM_HOME"
DEFAULT_STATE_DIR = "~/.cronium"


def state_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The state directory (argument, else ``$CRONIUM_HOME``, else ``~/.cronium``), created 0700."""
    chosen = Path(os.path.expanduser(os.fspath(path or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)))
    chosen.mkdir(mode=0o700, parents=True, exist_ok=True)
    chosen.chmod(0o700)
    return chosen
