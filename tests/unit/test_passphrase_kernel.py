"""A passphrase asked in a real notebook kernel: the frontend's password field (an input
request) while a ``%%cronium`` cell runs against an in-process SSH server, asked once, found
nowhere in the cell's output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.kernel_harness import kernel, run_cell_answering

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
    with kernel({"CRONIUM_HOME": str(tmp_path / "home"), "CRONIUM_DISPLAY": "text"}) as client:
        client.execute(f"%load_ext cronium_nb\n%cronium_servers {inventory}", reply=True, timeout=60)
        cell = run_cell_answering(client, "%%cronium -s all -o res\necho up from $USER", PASSPHRASE)
        assert cell.reply["status"] == "ok", cell.reply
        assert cell.prompts == [(f"Passphrase for {locked}: ", True)]  # once, for both servers
        assert "up from" in cell.text and PASSPHRASE not in cell.text
        check = client.execute("assert res.status == 'success', res.summary", reply=True, timeout=30)
        assert check["content"]["status"] == "ok", check["content"]
