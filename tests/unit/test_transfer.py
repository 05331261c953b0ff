"""Files in and out without Docker: the checks made before anything runs, the temporary names,
the text progress view, and one server's failure staying its own row against in-process SSH
servers (which, like an sshd without ``Subsystem sftp``, refuse SFTP) and a port that never
answers. The transfers themselves are shown against the real fleet (tests/integration/test_files.py).
"""

from __future__ import annotations

import posixpath
import socket
from pathlib import Path

import pytest

import cronium_nb as cn
from cronium_nb.notebook.transfer_view import TransferProgress, size_text
from cronium_nb.transfer import (
    COLUMNS,
    TEMP_SUFFIX,
    check_mode,
    check_remote_path,
    check_timeout,
    fetched_name,
    local_name,
    temp_name,
)


def test_remote_paths() -> None:
    assert check_remote_path("/srv/a b/ü") == "/srv/a b/ü"
    assert check_remote_path("~/x/y") == "x/y"  # SFTP and a login both start in the home
    assert check_remote_path("~") == "." and check_remote_path("~/") == "."
    assert check_remote_path(Path("/etc/hostname")) == "/etc/hostname"
    for bad in ["", "a\0b", None, 3]:
        with pytest.raises(ValueError, match="remote path"):
            check_remote_path(bad)


@pytest.mark.parametrize("remote", ["/tmp/..", "..", "/tmp/.", "/tmp/", "/"])
def test_fetched_names_that_would_climb_out_are_refused(remote: str) -> None:
    with pytest.raises(ValueError):
        fetched_name(remote)


def test_fetched_names_that_are_plain_stay() -> None:
    plain = {"/var/log/syslog": "syslog", "..hidden": "..hidden", "/x/-rf": "-rf", "a\\..\\b": "a\\..\\b"}
    for remote, name in plain.items():
        assert fetched_name(remote) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "x\0"])
def test_server_names_that_are_no_plain_file_name_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be used as a file name under dest"):
        local_name(name, "server name")


def test_mode_and_timeout_checks() -> None:
    assert check_mode(None) is None and check_mode(0o640) == 0o640 and check_mode(0) == 0
    for bad in [True, -1, 0o10000, "644", 6.4]:
        with pytest.raises(ValueError, match="mode must be"):
            check_mode(bad)
    assert check_timeout(None) is None and check_timeout(2) == 2.0
    for bad in [0, -1, True, "5"]:
        with pytest.raises(ValueError, match="timeout must be"):
            check_timeout(bad)


def test_temporary_names_are_hidden_fresh_and_next_to_the_destination() -> None:
    first, second = temp_name("/srv/app/app.tar"), temp_name("/srv/app/app.tar")
    assert first != second
    for temp in (first, second):
        assert posixpath.dirname(temp) == "/srv/app"  # same directory: the rename is atomic
        assert posixpath.basename(temp).startswith(".app.tar.cronium-") and temp.endswith(TEMP_SUFFIX)
    assert temp_name("relative.txt").startswith(".relative.txt.cronium-")
    long = temp_name("/d/" + "é" * 127)  # 254 bytes: the temporary name must still fit NAME_MAX
    assert len(posixpath.basename(long).encode()) <= 255


def test_text_progress_prints_each_quarter_once(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("CRONIUM_DISPLAY", "text")
    view = TransferProgress(["web1", "web2"], "put a → b")
    view.show()
    report = view.callback()
    mib = 1024 * 1024
    for done in range(mib, 8 * mib + 1, mib):
        report("web1", done, 8 * mib)
    report("web2", 3 * mib, None)  # size unknown: no percentage
    view.drain(wait=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[cronium] put a → b on web1, web2",
        "[web1] 25% (2.0 MiB of 8.0 MiB)",
        "[web1] 50% (4.0 MiB of 8.0 MiB)",
        "[web1] 75% (6.0 MiB of 8.0 MiB)",
        "[web1] 100% (8.0 MiB of 8.0 MiB)",
    ]
    assert view.done == {"web1": 8 * mib, "web2": 3 * mib}
    assert [size_text(n) for n in (None, 0, 1023, 1536, 5 * 1024**3)] == ["?", "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]


def test_a_server_without_sftp_and_a_closed_port_fail_alone(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(1)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once closed
    dead = cn.Server(
        name="dead", host="127.0.0.1", port=port, key_path=str(fleet.hub.key_path), known_hosts=str(fleet.known_hosts)
    )
    inventory = cn.Inventory([*fleet.inventory.servers.values(), dead])
    executor = local_executor(inventory, ssh_options=cn.SSHOptions(ssh_config=None, connect_attempts=1))
    local = tmp_path / "f.txt"
    local.write_text("x")

    frame = executor.put(local, "/tmp/f.txt", servers="all")
    assert list(frame.columns) == list(COLUMNS)
    by_server = frame.set_index("server")
    assert by_server.loc["dead", "status"] == "failed"
    assert "cannot reach" in by_server.loc["dead", "error"] and "Connection refused" in by_server.loc["dead", "error"]
    assert by_server.loc["srv-1", "status"] == "failed"
    assert by_server.loc["srv-1", "error"] == (
        "the server refused SFTP (Session request failed): its sshd needs a 'Subsystem sftp' line"
    )
    assert by_server["sha256"].tolist() == [None, None] and by_server["bytes"].tolist() == [0, 0]

    fetched = executor.fetch("/etc/hostname", servers="all", dest=tmp_path / "out").set_index("server")
    assert set(fetched["status"]) == {"failed"}
    assert not (tmp_path / "out").exists()  # nothing was read: no directory made

    # both are in the store, failures included, newest first
    recorded = executor.transfers()
    assert list(recorded["direction"]) == ["fetch", "fetch", "put", "put"]
    assert list(recorded["source"]) == ["/etc/hostname", "/etc/hostname", str(local), str(local)]
    assert set(recorded["status"]) == {"failed"} and recorded["error"].notna().all()
    assert recorded["transfer_id"].nunique() == 2
    assert executor.transfers(limit=1)["direction"].tolist() == ["fetch", "fetch"]


def test_a_port_that_never_answers_times_out(local_executor, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts (the kernel does), never sends an SSH banner
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text("")  # never reached: the handshake never starts
        server = cn.Server(name="silent", host="127.0.0.1", port=silent.getsockname()[1], known_hosts=str(known_hosts))
        executor = local_executor(cn.Inventory([server]))
        local = tmp_path / "f.txt"
        local.write_text("x")
        row = executor.put(local, "/tmp/f.txt", servers="all", timeout=2).iloc[0]
    assert (row["status"], row["error"]) == ("timeout", "the transfer did not finish within 2 s")
    assert row["duration_s"] < 30
