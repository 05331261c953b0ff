"""Driving a real notebook kernel in tests the way a frontend does, answering its input requests
(a password field) while a cell runs."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class CellRun:
    reply: dict[str, Any]  # the cell's execute_reply content
    prompts: list[tuple[str, bool]]  # (prompt, password field) of every input request
    text: str  # the stream output (stdout, stderr) the cell printed


@contextmanager
def kernel(env: dict[str, str]) -> Iterator[Any]:
    """A started python3 kernel's client (environment: ours, updated with ``env``)."""
    manager_module = pytest.importorskip("jupyter_client.manager")
    manager = manager_module.KernelManager(kernel_name="python3")
    manager.start_kernel(env={**os.environ, **env})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def run_cell_answering(client: Any, code: str, answer: str, limit: float = 60.0) -> CellRun:
    """Execute ``code``, answering every input request with ``answer``, until its reply (at most
    ``limit`` seconds: a cell that hangs fails the test)."""
    msg_id = client.execute(code, allow_stdin=True)
    prompts = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            request = client.get_stdin_msg(timeout=0.2)
        except queue.Empty:
            try:
                reply = client.get_shell_msg(timeout=0.01)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                break
            continue
        prompts.append((request["content"]["prompt"], request["content"]["password"]))
        client.input(answer)
    else:
        pytest.fail("the cell did not finish")
    outputs = []
    while True:
        try:
            message = client.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            break
        if message["msg_type"] == "stream":
            outputs.append(message["content"]["text"])
    return CellRun(reply["content"], prompts, "".join(outputs))
