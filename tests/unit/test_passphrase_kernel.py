"""A passphrase asked in a real notebook kernel: the frontend's password field (an input
request) while a ``%%cronium`` cell runs against an in-process SSH server, asked once, found
nowhere in the cell's output."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
import yaml

jupyter_client = pytest.importorskip("jupyter_client.manager")

PASSPHRASE = "tr0ub4dor&3"


@pytest.mark.filterwarnings("ignore:.*bcrypt.kdf")
def test_a_notebook_asks_for_a_key_s_passphrase_once(local_servers, tmp_path: Path) -> None:
    fleet = local_servers(2)
    locked = tmp_path / "id_locked"
    fleet.hub.client_key.write_private_key(str(locked), passphrase=PASSPHRASE, rounds=4)
    os.chmod(locked, 0o600)
    servers = [
        {**{k: getattr(fleet.server(name), k) for k in ("name", "host", "port", "user", "known_hosts")},
         "key_path": str(locked)}
        for name in fleet.names
    ]  # fmt: skip
    inventory = tmp_path / "servers.yaml"
    inventory.write_text(yaml.safe_dump({"servers": servers}))
    env = {**os.environ, "CRONIUM_HOME": str(tmp_path / "home"), "CRONIUM_DISPLAY": "text"}
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel(env=env)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        client.execute(f"%load_ext cronium_nb\n%cronium_servers {inventory}", reply=True, timeout=60)
        msg_id = client.execute("%%cronium -s all -o res\necho up from $USER", allow_stdin=True)
        prompts = []
        deadline = time.monotonic() + 60
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
            client.input(PASSPHRASE)
        else:
            pytest.fail("the cell did not finish")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert prompts == [(f"Passphrase for {locked}: ", True)]  # once, for both servers
        outputs = []
        while True:
            try:
                message = client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                break
            if message["msg_type"] == "stream":
                outputs.append(message["content"]["text"])
        text = "".join(outputs)
        assert "up from" in text and PASSPHRASE not in text
        check = client.execute("assert res.status == 'success', res.summary", reply=True, timeout=30)
        assert check["content"]["status"] == "ok", check["content"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
