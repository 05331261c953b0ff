"""Shared test settings. The fleet fixtures come from the cronium_nb pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


# The test files that take longest (25 s to 2.5 min each in one process), started first: `make
# test` hands whole files to its processes (`--dist loadfile --no-loadscope-reorder`), and a long
# file handed out last would keep one process busy while the others idle. The order comes from a
# one-process run's durations; only the order matters.
SLOWEST_FIRST = (
    "integration/test_wheel_install.py",  # one test, but 1.5 min on a cold cache (pip downloads)
    "integration/test_browser.py",
    "integration/test_detached.py",
    "integration/test_notebooks.py",
    "integration/test_runner_fleet.py",
    "integration/test_security_review.py",
    "integration/test_become.py",
    "integration/test_files_hostile.py",
    "integration/test_files.py",
    "integration/test_real_fleets.py",
    "integration/test_executor.py",
    "integration/test_dask.py",
    "integration/test_helper_contract.py",
    "integration/test_api_mode.py",
    "integration/test_faults.py",
    "unit/test_store.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(SLOWEST_FIRST)}
    tests = REPO_ROOT / "tests"
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(rank)))
