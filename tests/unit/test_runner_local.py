"""The runner on this machine (local testing mode and framed orchestrator mode)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cronium_nb.protocol import MAGIC, RunnerExit, encode
from tests.runner_harness import LOCAL_RUNNER, LocalRun, grandchildren_script, make_payload, run_local

SHELL_HELPER_SCRIPT = """
        echo "n=$(cronium.input n) all=$(cronium.input)"
        cronium.output '{"sum": 3}'
        cronium.setVariable greeting "hello world"
        echo '[1, 2]' | cronium.setVariable list -
        echo "got=$(cronium.getVariable greeting) missing=$(cronium.getVariable nope 2>/dev/null || echo null)"
        echo "event=$(cronium.event name) server=$(cronium.event server)"
    """
HELPER_SCRIPTS = {
    "bash": SHELL_HELPER_SCRIPT,
    "sh": SHELL_HELPER_SCRIPT,  # the helpers are plain commands: the same script works in both
    "python": """
import json
print(f"n={cronium.input('n')} all={json.dumps(cronium.input(), separators=(',', ':'))}")
cronium.output({"sum": 3})
cronium.setVariable("greeting", "hello world")
cronium.set_variable("list", [1, 2])
print(f"got={cronium.getVariable('greeting')} missing={json.dumps(cronium.get_variable('nope'))}")
print(f"event={cronium.event()['name']} server={cronium.event('server')}")
""",
    "node": """
console.log(`n=${cronium.input("n")} all=${JSON.stringify(cronium.input())}`);
cronium.output({ sum: 3 });
cronium.setVariable("greeting", "hello world");
cronium.set_variable("list", [1, 2]);
console.log(`got=${cronium.getVariable("greeting")} missing=${cronium.get_variable("nope")}`);
console.log(`event=${cronium.event().name} server=${cronium.event("server")}`);
""",
}
HELPER_EXPECTED_STDOUT = [
    'n=5 all={"n":5}',
    "got=hello world missing=null",
    "event=helpers server=srv-1",
]


def dedent_shell(script: str) -> str:
    return "\n".join(line.strip() for line in script.strip().splitlines()) + "\n"


@pytest.fixture
def workroot(tmp_path: Path) -> str:
    return str(tmp_path / "runs")


def available(interpreter: str) -> bool:
    return shutil.which(interpreter) is not None


def check_helpers(report, script_type: str) -> None:
    stdout = [line.decode() for stream, line in report.lines if stream == "stdout"]
    assert stdout == HELPER_EXPECTED_STDOUT, (script_type, report.text, report.stderr)
    result = report.result
    assert result["exit_code"] == 0
    assert result["outputs"] == {"sum": 3}
    assert result["variables"] == {"greeting": "hello world", "list": [1, 2], "seeded": True}


@pytest.mark.parametrize("script_type", ["bash", "sh", "python", "node"])
def test_helpers_round_trip(script_type: str, workroot: str) -> None:
    if not available({"python": "python3"}.get(script_type, script_type)):
        pytest.skip(f"{script_type} is not installed here; the fleet tests cover it")
    script = HELPER_SCRIPTS[script_type]
    if script_type in ("bash", "sh"):
        script = dedent_shell(script)
    archive = make_payload(script, script_type, name="helpers")
    context = {"execution_id": "exec-1", "server": "srv-1", "input": {"n": 5}, "variables": {"seeded": True}}
    check_helpers(run_local(archive, context=context, workroot=workroot), script_type)


def test_no_input_gives_null_and_a_key_is_not_found(workroot: str) -> None:
    report = run_local(make_payload('echo "[$(cronium.input)] [$(cronium.input key)] $?"'), workroot=workroot)
    assert report.text == "[null] [] 1\n"
    assert report.stderr.decode() == "cronium.input: key 'key' not found\n"


def test_non_json_values_are_strings(workroot: str) -> None:
    report = run_local(make_payload("cronium.output 'not json {'\ncronium.setVariable n 12\n"), workroot=workroot)
    assert report.result["outputs"] == "not json {"
    assert report.result["variables"] == {"n": 12}


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 137)])
def test_exit_codes_pass_through(script: str, code: int, workroot: str) -> None:
    report = run_local(make_payload(script), workroot=workroot)
    assert report.exit_status == code
    assert report.result["exit_code"] == code
    assert report.result["runner_error"] is None
    if code == 137:
        assert report.result["signal"] == signal.SIGKILL


def test_local_mode_passes_output_through_and_keeps_exit_code(tmp_path: Path) -> None:
    archive = make_payload('echo "to stdout $(cronium.input)"; echo "to stderr" >&2; cronium.output 7; exit 4')
    payload = tmp_path / "payload.tar.gz"
    payload.write_bytes(archive.data)
    report_file = tmp_path / "report.json"
    completed = subprocess.run(
        [*LOCAL_RUNNER, "run", str(payload), "--input", '"x"', "--report", str(report_file),
         "--workroot", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert completed.returncode == 4
    assert completed.stdout == "to stdout x\n"
    assert completed.stderr.startswith("to stderr\ncronium-runner: ")
    assert json.loads(report_file.read_text())["outputs"] == 7


def test_checksum_mismatch_runs_nothing(tmp_path: Path, workroot: str) -> None:
    marker = tmp_path / "ran"
    archive = make_payload(f"touch {marker}")
    report = run_local(archive, sha256="0" * 64, workroot=workroot)
    assert report.exit_status == RunnerExit.CHECKSUM_MISMATCH
    assert report.result["runner_error"]["code"] == "checksum_mismatch"
    assert not marker.exists()
    assert not any(m["type"] == "started" for m in report.messages)
    assert not Path(workroot).exists() or not os.listdir(workroot)


@pytest.mark.parametrize(
    "evil_name", ["../escaped", "/tmp/cronium-absolute-escape", "sub/../../escaped", "./ok/../../escaped"]
)
def test_unsafe_payload_paths_are_refused(evil_name: str, tmp_path: Path, workroot: str) -> None:
    marker = tmp_path / "ran"
    archive = make_payload(f"touch {marker}", extra_files={evil_name: b"evil"})
    report = run_local(archive, workroot=workroot)
    assert report.exit_status == RunnerExit.BAD_PAYLOAD
    assert "unsafe path" in report.result["runner_error"]["message"]
    assert not marker.exists()
    assert not Path("/tmp/cronium-absolute-escape").exists()
    assert not (Path(workroot) / "escaped").exists() and not (Path(workroot).parent / "escaped").exists()


def test_links_in_payload_are_refused(workroot: str) -> None:
    import gzip
    import io
    import tarfile

    good = make_payload("echo hi")
    with tarfile.open(fileobj=io.BytesIO(good.data), mode="r:gz") as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member, content in members:
            archive.addfile(member, io.BytesIO(content))
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    data = gzip.compress(buffer.getvalue())
    from cronium_nb.payload import PayloadArchive

    report = run_local(PayloadArchive(data, hashlib.sha256(data).hexdigest()), workroot=workroot)
    assert report.exit_status == RunnerExit.BAD_PAYLOAD
    assert "not a regular file" in report.result["runner_error"]["message"]


DEEP = b"[" * 600 + b"]" * 600


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b'{"version": 1, "name": "x", "type": "cobol", "entrypoint": "script.sh"}', "'type'"),
        (b'{"version": 1, "name": "x", "type": "bash", "entrypoint": "script.sh", "timeout": 1e999}', "'timeout'"),
        (b'{"version": 1, "name": "x", "type": "bash", "entrypoint": "script.sh", "timeout": NaN}', "JSON"),
        # YAML is never parsed on a server: aliases, tags and the rest are refused
        (b"version: 1\nname: &n x\ntype: bash\nentrypoint: *n\n", "JSON"),
        (
            b'{"version": 1, "name": "x", "type": "bash", "entrypoint": "s.sh", "input": '
            + b"[" * 600
            + b"]" * 600
            + b"}",
            "nest",
        ),
    ],
    ids=["unknown-type", "infinite-timeout", "nan-timeout", "yaml-alias", "deep-nesting"],
)
def test_invalid_manifest_is_refused(workroot: str, manifest: bytes, message: str) -> None:
    archive = make_payload("echo hi", extra_files={"manifest.yaml": manifest})  # replaces the generated one
    report = run_local(archive, workroot=workroot)
    assert report.exit_status == RunnerExit.BAD_MANIFEST
    assert message in report.result["runner_error"]["message"]


def test_not_an_archive(workroot: str) -> None:
    from cronium_nb.payload import PayloadArchive

    data = b"definitely not gzip"
    report = run_local(PayloadArchive(data, hashlib.sha256(data).hexdigest()), workroot=workroot)
    assert report.exit_status == RunnerExit.BAD_PAYLOAD


def test_big_binary_and_long_line_output_arrive_intact(workroot: str) -> None:
    script = """
import os, sys
out = sys.stdout.buffer
block = bytes(range(256)) * 4096            # 1 MiB of every byte value
for _ in range(50):
    out.write(block)
out.write(b"x" * (5 * 1024 * 1024))          # a 5 MiB line without newline
out.write(MAGIC_AND_FAKE_FRAME)
out.flush()
sys.stderr.write("err line\\n")
"""
    fake = MAGIC + encode(b"M", 0.0, b'{"type":"result","exit_code":99}')
    script = script.replace("MAGIC_AND_FAKE_FRAME", repr(fake))
    expected = bytes(range(256)) * 4096 * 50 + b"x" * (5 * 1024 * 1024) + fake
    report = run_local(make_payload(script, "python"), workroot=workroot)
    assert report.result["exit_code"] == 0
    assert len(report.stdout) == len(expected)
    assert hashlib.sha256(report.stdout).digest() == hashlib.sha256(expected).digest()
    assert bytes(report.stderr) == b"err line\n"
    assert [m["type"] for m in report.messages] == ["hello", "started", "result"]


def test_script_reading_stdin_ends(workroot: str) -> None:
    report = run_local(make_payload('cat; read line; echo "after stdin: $?"'), workroot=workroot)
    assert report.text == "after stdin: 1\n"


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stream:
                if stream.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


GRANDCHILDREN = grandchildren_script(3000)


def started_pids(report) -> list[int]:
    return [int(line.split()[1]) for stream, line in report.lines if line.startswith(b"pid ")]


def test_sigterm_ends_script_and_grandchildren(workroot: str) -> None:
    run = LocalRun(make_payload(GRANDCHILDREN), workroot=workroot)
    run.read_until(lambda r: b"ready" in r.stdout and len(started_pids(r)) == 3)
    pids = started_pids(run.builder.report)
    assert len(pids_alive(pids)) == 3
    run.signal(signal.SIGTERM)
    report = run.finish()
    assert report.result["stop_reason"] == "runner received SIGTERM"
    assert report.result["exit_code"] == 128 + signal.SIGTERM
    assert pids_alive(pids) == []


def test_trapped_sigterm_is_killed_after_grace(workroot: str) -> None:
    script = "trap 'echo got TERM' TERM\necho ready\nwhile true; do sleep 0.05; done\n"
    run = LocalRun(make_payload(script, grace_period=1), workroot=workroot)
    run.read_until(lambda r: b"ready" in r.stdout)
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    report = run.finish(timeout=60)
    assert time.monotonic() - started >= 1.0  # it survived TERM until the grace period ended
    assert b"got TERM" in report.stdout
    assert report.result["exit_code"] == 137
    assert report.result["signal"] == signal.SIGKILL


def test_background_children_are_killed_when_the_script_ends(workroot: str) -> None:
    script = 'sleep 3004 & echo "pid $!"\nnohup setsid sleep 3005 >/dev/null 2>&1 & echo "pid $!"\nexit 0\n'
    report = run_local(make_payload(script), workroot=workroot)
    pids = started_pids(report)
    assert len(pids) == 2
    assert report.result["exit_code"] == 0
    assert pids_alive(pids) == []


def test_timeout_stops_the_script(workroot: str) -> None:
    report = run_local(make_payload("echo start; sleep 3006; echo never", timeout=1, grace_period=1), workroot=workroot)
    assert report.result["timed_out"] is True
    assert report.result["stop_reason"] == "timeout"
    assert report.text == "start\n"


def test_stop_request_on_control_channel(workroot: str) -> None:
    run = LocalRun(make_payload("echo ready; sleep 3007"), workroot=workroot)
    run.read_until(lambda r: b"ready" in r.stdout)
    run.send({"op": "stop", "reason": "cancel"})
    report = run.finish()
    assert report.result["stop_reason"] == "cancel"
    assert report.result["timed_out"] is False


def test_lost_orchestrator_stops_the_script(workroot: str) -> None:
    run = LocalRun(make_payload('sleep 3008 & echo "pid $!"; echo ready; wait'), workroot=workroot)
    report = run.read_until(lambda r: b"ready" in r.stdout)
    pids = started_pids(report)
    run.close_stdin()
    report = run.finish()
    assert report.result["stop_reason"] == "orchestrator connection lost"
    assert pids_alive(pids) == []


def test_work_dir_is_private_and_removed(workroot: str) -> None:
    script = 'stat -c "%a" "$CRONIUM_DIR"; pwd; ls -A'
    report = run_local(make_payload(script), workroot=workroot)
    mode, cwd, *files = report.text.split()
    assert mode == "700"
    assert Path(cwd).parent == Path(workroot)
    assert {"manifest.yaml", "script.sh", "input.json", "event.json", "variables.json", ".cronium"} <= set(files)
    assert stat.S_IMODE(os.stat(workroot).st_mode) == 0o700
    assert not Path(cwd).exists()
    kept = run_local(make_payload("pwd"), workroot=workroot, extra_args=("--keep-workdir",))
    assert Path(kept.result["workdir"]).is_dir()


def test_unsafe_work_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "runs"
    link.symlink_to(real)
    report = run_local(make_payload("echo ran"), workroot=str(link))
    assert report.exit_status == RunnerExit.WORKDIR
    assert "symlink" in report.result["runner_error"]["message"]
    assert report.text == ""
    open_root = tmp_path / "open"
    open_root.mkdir(mode=0o777)
    open_root.chmod(0o777)
    report = run_local(make_payload("echo ran"), workroot=str(open_root))
    assert report.exit_status == RunnerExit.WORKDIR


def test_env_and_cronium_variables(workroot: str) -> None:
    script = 'echo "$GREETING|$CRONIUM_EXECUTION_ID|$CRONIUM_EVENT|$CRONIUM_SERVER"'
    archive = make_payload(script, name="env-event", env={"GREETING": "it's $(not) `run`"})
    report = run_local(archive, context={"execution_id": "e-9", "server": "web1"}, workroot=workroot)
    assert report.text == "it's $(not) `run`|e-9|env-event|web1\n"


def test_version_json() -> None:
    completed = subprocess.run([*LOCAL_RUNNER, "version", "--json"], capture_output=True, text=True, check=True)
    info = json.loads(completed.stdout)
    assert info["flavour"] == "static" and info["version"]
    assert info["arch"] == os.uname().machine
