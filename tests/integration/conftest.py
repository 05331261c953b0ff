"""Fixtures shared by the fleet tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cronium_nb import Executor, Inventory

FAST_BACKOFF = (0.2, 0.2, 0.2)  # deploy retries, short: a test waits for them


@pytest.fixture
def executor_factory(tmp_path: Path) -> Iterator[Callable[..., Executor]]:
    """``make(inventory, **options)``: an executor with its own state dir and short deploy
    back-offs (unless given); every one made is closed after the test."""
    made: list[Executor] = []

    def make(inventory: Inventory, **options: Any) -> Executor:
        options.setdefault("deploy_backoff", FAST_BACKOFF)
        executor = Executor(inventory, state_dir=tmp_path / f"state{len(made)}", **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()
