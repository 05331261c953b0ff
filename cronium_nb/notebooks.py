"""Executing the example notebooks headless (nbclient), for `make demo` and the tests."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cronium_nb.resources import notebooks_dir
from cronium_nb.views import DISPLAY_ENV

NOTEBOOKS = notebooks_dir()  # the installed package's examples, or the checkout's notebooks/


def execute(path: str | os.PathLike[str], *, timeout: float = 600) -> nbformat.NotebookNode:
    """Run every cell of a notebook in a fresh kernel; raises on the first failing cell.

    No widget frontend watches a headless run, so live views print prefixed lines instead.
    """
    notebook = nbformat.read(path, as_version=4)
    os.environ[DISPLAY_ENV] = "text"  # inherited by the kernel
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(Path(path).parent)}}
    )
    client.execute()
    return notebook


def text_outputs(notebook: nbformat.NotebookNode) -> list[str]:
    """The printed and displayed text of every code cell, in order."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                texts.append(output["data"]["text/plain"])
    return texts
