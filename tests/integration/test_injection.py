"""Nothing a user writes reaches a remote shell: hostile names, input, env and secrets arrive in
the script verbatim, and canary files prove that none of the embedded commands ran."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import cronium_nb as cn
from cronium_nb import Event, Executor, Fleet

pytestmark = pytest.mark.fleet
CANARY = "/tmp/cronium-canary"
HOSTILE = (
    f"x'; touch {CANARY}-1; echo '$(touch {CANARY}-2)`touch {CANARY}-3`\"; touch {CANARY}-4\n"
    f"| touch {CANARY}-5 & ${{IFS}}touch${{IFS}}{CANARY}-6 \\ ü 日本 ✓"
)
# A secret of its own: secrets are redacted wherever they appear, so the script reports its hash.
HOSTILE_SECRET = f"s'; touch {CANARY}-7 $(touch {CANARY}-8)`touch {CANARY}-9` ü"
REPORT = """
import hashlib, json, os
cronium.output({
    "event": cronium.event("name"),
    "event_env": os.environ["CRONIUM_EVENT"],
    "server": cronium.event("server"),
    "server_env": os.environ["CRONIUM_SERVER"],
    "input": cronium.input("v"),
    "env": os.environ["HOSTILE"],
    "secret_sha256": hashlib.sha256(os.environ["HOSTILE_SECRET"].encode()).hexdigest(),
})
"""


@pytest.mark.parametrize("api", [False, True], ids=["bundled", "api"])
def test_hostile_values_arrive_verbatim_and_run_nothing(cronium_fleet: Fleet, tmp_path: Path, api: bool) -> None:
    servers = [
        cn.Server(name=f"{HOSTILE}-{s.name}", host=s.host, port=s.port, key_path=s.key_path, known_hosts=s.known_hosts)
        for s in cronium_fleet.servers
    ]
    event = Event(
        name=HOSTILE, script=REPORT, type="python", env={"HOSTILE": HOSTILE}, secrets={"HOSTILE_SECRET": HOSTILE_SECRET}
    )
    with Executor(cn.Inventory(servers), state_dir=tmp_path / "state") as executor:
        result = executor.run(event, servers=servers, input={"v": HOSTILE}, api=api)
        history = executor.history()
    assert result.ok, result.summary.to_string()
    for server in servers:
        assert result[server.name].outputs == {
            "event": HOSTILE,
            "event_env": HOSTILE,
            "server": server.name,
            "server_env": server.name,
            "input": HOSTILE,
            "env": HOSTILE,
            "secret_sha256": hashlib.sha256(HOSTILE_SECRET.encode()).hexdigest(),
        }
    assert list(history["event"]) == [HOSTILE]
    for name in cronium_fleet.names:
        listing = cronium_fleet.exec(name, f"ls {CANARY}-* 2>&1; ls / | grep -c canary || true").output
        assert "No such file" in listing and listing.strip().endswith("0"), listing


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    secret = "s3cr3t-in-repr"
    event = Event(name="quiet", script="true", secrets={"TOKEN": secret})
    assert secret not in repr(event) and secret not in str(event)
    with pytest.raises(cn.EventError) as caught:
        Event(name="quiet", script="true", secrets={"TOKEN": secret + "\0"})
    assert secret not in str(caught.value)


def test_nul_bytes_are_refused_before_anything_runs(cronium_fleet: Fleet) -> None:
    with pytest.raises(cn.EventError, match="must not contain NUL"):
        Event(name="bad\0name", script="true")
    with pytest.raises(cn.EventError, match="without NUL bytes"):
        Event(name="env", script="true", env={"A": "x\0y"})
    with pytest.raises(cn.EventError, match="without NUL bytes"):
        Event(name="secret", script="true", secrets={"A": "x\0y"})
    with pytest.raises(ValueError, match="must not contain NUL"):
        cn.Server(name="a\0b", host="127.0.0.1")
    with pytest.raises(cn.EventError, match="not a valid variable name"):
        Event(name="env", script="true", env={"A;touch /tmp/x": "1"})
