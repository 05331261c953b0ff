"""The example notebooks, executed by a real kernel (nbclient): each ends with its own checks."""

from __future__ import annotations

import pytest

from cronium_nb.notebooks import NOTEBOOKS, execute, text_outputs

pytestmark = pytest.mark.fleet


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_and_its_checks_pass(name: str) -> None:
    notebook = execute(NOTEBOOKS / name)
    assert "all checks passed" in "".join(text_outputs(notebook))
