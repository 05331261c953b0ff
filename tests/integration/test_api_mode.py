"""API mode: helpers talk to the executor's runtime service through an SSH reverse tunnel."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
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


def call(port: int, execution_id: str, token: str | None, path: str = "input") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/executions/{execution_id}/{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_wrong_expired_and_foreign_tokens_are_refused(executor: Executor) -> None:
    service = executor._runtime
    port = executor._loop_thread.call(service.start())
    run_a = ApiRun("exec-a", "srv", "a", {"n": 1}, {})
    run_b = ApiRun("exec-b", "srv", "b", {"n": 2}, {})
    token_a = service.register(run_a, timeout=60)
    service.register(run_b, timeout=60)
    now = int(time.time())
    assert call(port, "exec-a", token_a) == 200
    assert call(port, "exec-a", None) == 401
    forged = token_a[:-4] + ("AAAA" if not token_a.endswith("AAAA") else "BBBB")
    assert call(port, "exec-a", forged) == 401
    expired = service.token_for_test({"exec": "exec-a", "srv": "srv", "iat": now - 100, "exp": now - 10})
    assert call(port, "exec-a", expired) == 401
    assert call(port, "exec-b", token_a) == 403  # a good token, for another execution
    other_secret = "another secret, long enough for HS256 keys"
    alien = jwt.encode({"exec": "exec-a", "srv": "srv", "exp": now + 60}, other_secret, algorithm="HS256")
    assert call(port, "exec-a", alien) == 401
    service.unregister("exec-a", "srv")
    assert call(port, "exec-a", token_a) == 403  # the run is over


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
    fleet = cronium_fleet_factory(amd64=1, arm64=1, sshd_options={"AllowTcpForwarding": "no"}, name_prefix="nofwd-")
    with Executor(fleet.inventory, state_dir=tmp_path / "state") as executor:
        result = executor.run(
            Event(name="fallback", script='cronium.output "$(cronium.input n)"'), input={"n": 3}, api=True
        )
    assert result.ok, result.summary.to_string()
    for name in fleet.names:
        assert result[name].helpers.startswith("bundled (API unavailable")
        assert result[name].outputs == 3
    assert json.dumps(result.outputs)
