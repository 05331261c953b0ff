"""Shared test settings. The fleet fixtures come from the cronium_nb pytest plugin."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
