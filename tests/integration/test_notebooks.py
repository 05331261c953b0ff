"""The notebook layer in a real kernel: the example notebooks (each ends with its own checks),
interrupting a running ``%%cronium`` cell, usage errors, and the widget view."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.manager import KernelManager

from cronium_nb import Fleet
from cronium_nb.notebooks import NOTEBOOKS, execute, text_outputs

pytestmark = pytest.mark.fleet


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRONIUM_HOME", str(tmp_path / "cronium-home"))  # kernels inherit it
    # and their temporary files (the notebooks' mkdtemp() state dirs, Dask's scratch space) go
    # with the test's, not into the machine's /tmp
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_and_its_checks_pass(name: str) -> None:
    notebook = execute(NOTEBOOKS / name)
    assert "all checks passed" in "".join(text_outputs(notebook))


class Kernel:
    """A real IPython kernel driven the way a notebook frontend drives it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env={**os.environ, **env})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def start(self, code: str) -> str:
        return self.client.execute(code)

    def messages(self, msg_id: str, until, timeout: float = 120) -> list[dict[str, Any]]:
        """iopub messages of one request until ``until(messages)`` holds (a bounded wait)."""
        collected: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not until(collected):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; got {[m['msg_type'] for m in collected]}"
            try:
                message = self.client.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                continue
            if message["parent_header"].get("msg_id") == msg_id:
                collected.append(message)
        return collected

    def run(self, code: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        msg_id = self.start(code)
        messages = self.messages(msg_id, idle, timeout)
        reply = self.client.get_shell_msg(timeout=timeout)
        return reply["content"], messages

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def idle(messages: list[dict[str, Any]]) -> bool:
    return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in messages)


def text_of(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message["content"]
        if message["msg_type"] == "stream":
            parts.append(content["text"])
        elif message["msg_type"] in ("execute_result", "display_data"):
            parts.append(content["data"].get("text/plain", ""))
        elif message["msg_type"] == "error":
            parts.append(f"{content['ename']}: {content['evalue']}")
    return "".join(parts)


@pytest.fixture
def inventory_file(cronium_fleet: Fleet, tmp_path: Path) -> Path:
    path = tmp_path / "servers.yaml"
    servers = [
        {"name": s.name, "host": s.host, "port": s.port, "key_path": s.key_path, "known_hosts": s.known_hosts}
        for s in cronium_fleet.servers
    ]
    path.write_text(yaml.safe_dump({"servers": servers}))
    return path


@pytest.fixture
def text_kernel():
    kernel = Kernel({"CRONIUM_DISPLAY": "text"})
    yield kernel
    kernel.close()


def test_interrupting_a_cell_cancels_the_remote_work(cronium_fleet: Fleet, inventory_file: Path, text_kernel) -> None:
    reply, _ = text_kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory_file}")
    assert reply["status"] == "ok"
    msg_id = text_kernel.start("%%cronium -s all -o res\necho started on $(hostname)\nsleep 300")
    started = [f"[{name}] started on {name}" for name in cronium_fleet.names]
    text_kernel.messages(msg_id, lambda messages: all(line in text_of(messages) for line in started))
    interrupted_at = time.monotonic()
    text_kernel.manager.interrupt_kernel()
    messages = text_kernel.messages(msg_id, idle, timeout=60)
    reply = text_kernel.client.get_shell_msg(timeout=10)["content"]
    assert time.monotonic() - interrupted_at < 30
    assert reply["status"] == "ok"  # the cell ends with the cancelled result, not a traceback
    output = text_of(messages)
    assert "cancelled" in output and "Traceback" not in output
    assert not any(m["msg_type"] == "error" for m in messages)
    for name in cronium_fleet.names:
        assert "sleep 300" not in cronium_fleet.exec(name, "ps -eo args").output
    reply, messages = text_kernel.run("print(res.status.value, sorted(res.summary['status']))")
    assert text_of(messages).strip() == "cancelled ['cancelled', 'cancelled']"


def test_usage_errors_are_one_line(inventory_file: Path, text_kernel) -> None:
    text_kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory_file}")
    cases = {
        "%%cronium -s nope\necho hi": "unknown server or group 'nope'",
        "%%cronium -t cobol\necho hi": "argument -t/--type: invalid choice: 'cobol'",
        "%%cronium --timeout 0\necho hi": "timeout must be a positive number",
        "%%cronium -i '{bad'\necho hi": "--input is not valid JSON",
        "%%cronium -I missing\necho hi": "--input-from: no variable 'missing'",
        "%%cronium\n   \n": "has an empty script",
        "%cronium_servers /nonexistent.yaml": "cannot read inventory",
    }
    for code, expected in cases.items():
        reply, messages = text_kernel.run(code)
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        shown = text_of(messages)
        assert reply["status"] == "error" or "UsageError" in shown, code
        assert expected in shown, (code, shown)
        assert all(error["ename"] == "UsageError" for error in errors), errors
        assert "Traceback" not in shown


def test_widget_view_in_a_kernel_with_a_frontend(cronium_fleet: Fleet, inventory_file: Path) -> None:
    kernel = Kernel({"CRONIUM_DISPLAY": "widgets"})
    try:
        kernel.run(f"%load_ext cronium_nb\n%cronium_servers {inventory_file}")
        reply, messages = kernel.run("%%cronium -s all -o res\necho widgets on $(hostname)")
        assert reply["status"] == "ok"
        widget_views = [
            m for m in messages
            if m["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        ]  # fmt: skip
        assert widget_views
        updates = [m for m in messages if m["msg_type"] == "comm_msg"]
        states = " ".join(str(m["content"]["data"].get("state", {})) for m in updates)
        for name in cronium_fleet.names:
            assert f"widgets on {name}" in states
        results = [m for m in messages if m["msg_type"] == "execute_result"]
        assert "text/html" in results[0]["content"]["data"] and "success" in results[0]["content"]["data"]["text/html"]
    finally:
        kernel.close()
