"""API mode: helpers talk to the executor's runtime service through an SSH stream-local forward."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import jwt
import pytest

from cronium_nb import Callbacks, Event, Executor, Fleet, Status
from cronium_nb.runtime_api import ApiRun
from tests.unit.test_runner_local import HELPER_SCRIPTS, dedent_shell

pytestmark = pytest.mark.fleet


@pytest.fixture
def executor(cronium_fleet: Fleet, tmp_path: Path):
    with Executor(cronium_fleet.inventory, state_dir=tmp_path / "state") as executor:
        yield executor


@pytest.mark.parametrize("script_type", ["bash", "sh", "python", "node"])
def test_bundled_helper_scripts_pass_unchanged_in_api_mode(
    cronium_fleet: Fleet, executor: Executor, script_type: str
) -> None:
    script = HELPER_SCRIPTS[script_type]
    script = dedent_shell(script) if script_type in ("bash", "sh") else script
    executor.store.set_variable("global", "seeded", True)
    result = executor.run(
        Event(name="helpers", script=script, type=script_type), servers="all", input={"n": 5}, api=True
    )
    assert result.status == Status.SUCCESS, result.summary.to_string()
    for name in cronium_fleet.names:
        assert result[name].helpers == "api"
        lines = result.logs.query("server == @name")["line"].tolist()
        assert lines == ['n=5 all={"n":5}', "got=hello world missing=null", f"event=helpers server={name}"]
        assert result[name].outputs == {"sum": 3}
        assert result[name].variables == {"seeded": True, "greeting": "hello world", "list": [1, 2]}
    assert executor.store.get_variables("global")["greeting"] == "hello world"


def test_variables_are_seen_live_while_the_script_runs(cronium_fleet: Fleet, executor: Executor) -> None:
    seen: list[tuple[str, str, object, bool]] = []
    job_holder: list = []
    both = threading.Event()

    def on_variable(server: str, name: str, value: object) -> None:
        seen.append((server, name, value, job_holder[0].done() if job_holder else False))
        if sum(1 for entry in seen if entry[1] == "progress") == 2 * len(cronium_fleet.names):
            both.set()

    script = "cronium.setVariable progress 1\nsleep 2\ncronium.setVariable progress 2\nsleep 2\necho done\n"
    job = executor.submit(
        Event(name="live", script=script), servers="all", api=True, callbacks=Callbacks(on_variable=on_variable)
    )
    job_holder.append(job)
    assert both.wait(120)
    result = job.result(timeout=120)
    assert result.ok
    for name in cronium_fleet.names:
        mine = [(value, finished) for server, _, value, finished in seen if server == name]
        assert [value for value, _ in mine] == [1, 2]
        assert not any(finished for _, finished in mine)  # both arrived while the job was running
        assert result[name].variables["progress"] == 2


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_two_concurrent_api_jobs_on_one_server(cronium_fleet: Fleet, executor: Executor, arch: str) -> None:
    target = f"{arch}-1"
    event = Event(name="twins", script='sleep 1; cronium.output "$(cronium.input who)"')
    jobs = [executor.submit(event, servers=[target], input={"who": who}, api=True) for who in ("left", "right")]
    results = [job.result(timeout=120) for job in jobs]
    assert [r[target].outputs for r in results] == ["left", "right"]
    assert [r[target].helpers for r in results] == ["api", "api"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to the runtime service's Unix socket."""

    def __init__(self, path: Path, timeout: float = 10) -> None:
        super().__init__("cronium-api", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def call(path: Path, execution_id: str, token: str | None, endpoint: str = "input") -> int:
    connection = UnixHTTPConnection(path)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        connection.request("GET", f"/v1/executions/{execution_id}/{endpoint}", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_wrong_expired_and_foreign_tokens_are_refused(executor: Executor) -> None:
    service = executor._runtime
    socket_path = executor._loop_thread.call(service.start())
    run_a = ApiRun("exec-a", "srv", "a", {"n": 1}, {})
    run_b = ApiRun("exec-b", "srv", "b", {"n": 2}, {})
    token_a = service.register(run_a, timeout=60)
    service.register(run_b, timeout=60)
    now = int(time.time())
    assert call(socket_path, "exec-a", token_a) == 200
    assert call(socket_path, "exec-a", None) == 401
    forged = token_a[:-4] + ("AAAA" if not token_a.endswith("AAAA") else "BBBB")
    assert call(socket_path, "exec-a", forged) == 401
    expired = service.token_for_test({"exec": "exec-a", "srv": "srv", "iat": now - 100, "exp": now - 10})
    assert call(socket_path, "exec-a", expired) == 401
    assert call(socket_path, "exec-b", token_a) == 403  # a good token, for another execution
    other_secret = "another secret, long enough for HS256 keys"
    alien = jwt.encode({"exec": "exec-a", "srv": "srv", "exp": now + 60}, other_secret, algorithm="HS256")
    assert call(socket_path, "exec-a", alien) == 401
    service.unregister("exec-a", "srv")
    assert call(socket_path, "exec-a", token_a) == 403  # the run is over


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_token_is_not_in_the_process_list(cronium_fleet: Fleet, executor: Executor, arch: str) -> None:
    target = f"{arch}-1"
    tokens: list[str] = []
    original = executor._runtime.register

    def remember(run, timeout):
        token = original(run, timeout)
        tokens.append(token)
        return token

    executor._runtime.register = remember
    snapshots: list[str] = []
    started = threading.Event()
    job = executor.submit(
        Event(name="quiet", script="echo go; sleep 3; cronium.output ok"),
        servers=[target],
        api=True,
        callbacks=Callbacks(on_line=lambda *_: started.set()),
    )
    assert started.wait(60)
    while not job.done():
        snapshots.append(cronium_fleet.exec(target, "ps -eo args; ps eww -eo args").output)
    assert job.result().ok and job.result()[target].outputs == "ok"
    assert tokens and snapshots
    assert all(tokens[0] not in snapshot for snapshot in snapshots)
    assert any("sleep 3" in snapshot for snapshot in snapshots)


def test_forbidden_forwarding_falls_back_to_bundled_mode(cronium_fleet_factory, tmp_path: Path) -> None:
    fleet = cronium_fleet_factory(
        amd64=1, arm64=1, sshd_options={"AllowStreamLocalForwarding": "no"}, name_prefix="nofwd-"
    )
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(
            Event(name="fallback", script='cronium.output "$(cronium.input n)"'), input={"n": 3}, api=True
        )
    assert result.ok, result.summary.to_string()
    for name in fleet.names:
        assert result[name].helpers.startswith("bundled (API unavailable")
        assert result[name].outputs == 3
    assert json.dumps(result.outputs)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_forward_is_a_private_socket_open_only_during_the_run(
    cronium_fleet: Fleet, executor: Executor, arch: str
) -> None:
    """Only the run's user can reach the runtime service from the server, only while an API-mode
    run is registered on the connection, and no TCP port is opened on the server for it."""
    target = f"{arch}-1"
    listen_before = cronium_fleet.exec(target, "cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"0A\"' | wc -l").output
    script = (
        'echo "socket=$CRONIUM_API_SOCKET"\n'
        'stat -c "%a %U" "$CRONIUM_API_SOCKET" "$(dirname "$CRONIUM_API_SOCKET")"\n'
        "cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"0A\"' | wc -l\n"
        # another user of the server (uid 1001, no key to anything) tries to connect
        "su intruder -s /bin/sh -c \"python3 -c 'import socket,sys; s = socket.socket(socket.AF_UNIX); "
        's.connect(sys.argv[1])\' "$CRONIUM_API_SOCKET"" 2>&1 | tail -1\n'
    )
    result = executor.run(Event(name="forward", script=script), servers=[target], api=True)
    assert result.ok, result.summary.to_string()
    lines = result.logs["line"].tolist()
    socket_path = lines[0].removeprefix("socket=")
    assert socket_path.startswith("/root/.cache/cronium/runner/api-") and socket_path.endswith(".sock")
    assert lines[1:3] == ["600 root", "700 root"]
    assert lines[3] == listen_before.strip()  # no listening TCP socket added on the server
    assert "PermissionError" in lines[4]
    # the run is over: the forward is closed and its socket removed
    assert cronium_fleet.exec(target, f"test -e {socket_path} && echo present || echo gone").output.strip() == "gone"
    stale = cronium_fleet.exec(target, "ls /root/.cache/cronium/runner/ | grep -c '^api-' || true").output.strip()
    assert stale == "0"
