"""The orchestrator (executor, pool, deploy, runner sessions and daemon, the runtime API) against
in-process SSH servers running the runner built for this machine: what the fleet suite checks
first, in seconds and without Docker. See inprocess_sshd.py for what the server does."""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from cronium_nb import Callbacks, Event, Inventory, SSHOptions, Status
from tests.runner_harness import wait_for

pytestmark = pytest.mark.timeout(60)  # a hang is the bug; each test takes a few seconds at most
MACHINE = os.uname().machine


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def runner_dir(fleet, name: str) -> Path:
    return fleet[name].home / ".cache" / "cronium" / "runner"


def installed_runners(fleet, name: str) -> list[Path]:
    return sorted(runner_dir(fleet, name).glob("*/cronium-runner"))


def read_pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()] if path.exists() else []


def wait_for_output(executor, event: Event, **options):
    """Submit and return once every targeted server's script has printed a line."""
    servers: set[str] = set()
    everyone = threading.Event()
    count = len(options.get("servers") or executor.inventory.select())

    def on_line(server: str, stream: str, text: str, ts: float) -> None:
        servers.add(server)
        if len(servers) == count:
            everyone.set()

    job = executor.submit(event, callbacks=Callbacks(on_line=on_line), **options)
    assert everyone.wait(30), "the script never printed"
    return job


def test_a_run_on_two_servers_returns_lines_outputs_and_redacted_secrets(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    script = (
        'echo "hello from $(cronium.event server)"\n'
        'echo "input n=$(cronium.input n)"\n'
        'echo "token=$TOKEN" >&2\n'
        'cronium.output "{\\"server\\": \\"$(cronium.event server)\\", \\"machine\\": \\"$(uname -m)\\"}"\n'
    )
    event = Event(name="hello", script=script, secrets={"TOKEN": "s3cret-value"}, input={"n": 7})
    result = executor.run(event, servers="all")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    rows = result.summary.set_index("server")
    assert list(rows.index) == fleet.names
    assert set(rows["status"]) == {"success"} and set(rows["exit_code"]) == {0}
    assert rows["error"].isna().all() and rows["error_kind"].isna().all()
    assert set(rows["arch"]) == {MACHINE}
    assert result.outputs == {name: {"server": name, "machine": MACHINE} for name in fleet.names}
    for name in fleet.names:
        logs = result.logs.query("server == @name")
        assert logs.query("stream == 'stdout'")["line"].tolist() == [f"hello from {name}", "input n=7"]
        assert logs.query("stream == 'stderr'")["line"].tolist() == ["token=***"]
        assert result[name].helpers == "bundled"
    assert executor.history().iloc[0]["status"] == "success"


def test_the_first_run_deploys_the_next_is_cached_and_a_new_executor_verifies(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    event = Event(name="deploy", script="echo fine")
    first = executor.run(event)
    assert first.status == Status.SUCCESS, first.summary.to_string()
    assert list(first.summary["deploy"]) == ["deployed", "deployed"]
    assert list(first.summary["attempts"]) == [1, 1]
    for name in fleet.names:
        [binary] = installed_runners(fleet, name)
        for directory in (binary.parent, binary.parent.parent, binary.parent.parent.parent):
            assert directory.stat().st_mode & 0o777 == 0o700
    sent = executor.metrics().set_index("metric")["value"]["deployments.bytes_sent"]
    assert sent > 0
    second = executor.run(event)
    assert second.status == Status.SUCCESS
    assert list(second.summary["deploy"]) == ["cached", "cached"]
    assert list(second.summary["attempts"]) == [0, 0]
    assert executor.metrics().set_index("metric")["value"]["deployments.bytes_sent"] == sent
    again = local_executor(fleet.inventory).run(event)  # a new state dir: it knows nothing yet
    assert again.status == Status.SUCCESS
    assert list(again.summary["deploy"]) == ["verified", "verified"]


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_runner_damaged_on_the_server_is_redeployed(local_servers, local_executor, damage: str) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    event = Event(name="damaged", script="echo fine")
    assert executor.run(event).ok
    [binary] = installed_runners(fleet, "srv-1")
    before = binary.read_bytes()
    if damage == "corrupt":
        binary.unlink()  # replaced, not rewritten: the running session still executes the old file
        binary.write_bytes(b"junk\n")
        binary.chmod(0o700)
    else:
        for path in sorted(runner_dir(fleet, "srv-1").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    result = executor.run(event)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result["srv-1"].deploy == "deployed"
    assert result.logs["line"].tolist() == ["fine"]
    assert installed_runners(fleet, "srv-1") == [binary] and binary.read_bytes() == before


def test_a_non_zero_exit_code_is_recorded_and_fails_only_that_server(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    script = 'if [ "$(cronium.event server)" = srv-2 ]; then echo bad >&2; exit 3; fi; echo good'
    result = local_executor(fleet.inventory).run(Event(name="partial", script=script))
    assert result.status == Status.PARTIAL
    rows = result.summary.set_index("server")
    assert rows.loc["srv-2", "status"] == "failed" and rows.loc["srv-2", "exit_code"] == 3
    assert rows.loc["srv-2", "error"] == "exit code 3" and rows.loc["srv-2", "error_kind"] == "script"
    assert rows.loc["srv-1", "status"] == "success" and rows.loc["srv-1", "exit_code"] == 0
    stderr = result.logs.query("stream == 'stderr'")
    assert stderr["server"].tolist() == ["srv-2"] and stderr["line"].tolist() == ["bad"]


def test_a_timeout_ends_the_scripts_whole_process_tree(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(1)
    pids = tmp_path / "pids"
    # The script ignores SIGTERM; a child in the background and one in a session of its own.
    script = (
        f"echo $$ > {pids}; sleep 5101 & echo $! >> {pids}; setsid sleep 5102 & "
        f"trap '' TERM; echo started; while true; do sleep 0.1; done"
    )
    executor = local_executor(fleet.inventory)
    started = time.monotonic()
    result = executor.run(Event(name="slow", script=script, timeout=1, grace_period=0.5))
    elapsed = time.monotonic() - started
    assert result.status == Status.TIMEOUT, result.summary.to_string()
    assert result["srv-1"].error == "timed out after 1 s" and result["srv-1"].error_kind == "timeout"
    assert 1 <= elapsed < 1 + 0.5 + 10
    assert len(read_pids(pids)) == 2
    assert wait_for(lambda: not any(alive(pid) for pid in read_pids(pids)), timeout=10)
    assert wait_for(lambda: not [p for p in fleet["srv-1"].processes() if "sleep 510" in cmdline(p)], timeout=10)
    assert executor.metrics().set_index("metric")["value"]["executions.timeout"] == 1


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_cancel_stops_the_scripts_and_the_session_survives(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    pids = {name: tmp_path / f"pids-{name}" for name in fleet.names}
    script = 'p=$(cronium.input dir)/pids-$(cronium.event server); echo $$ > "$p"; sleep 5103 & echo $! >> "$p"; '
    script += "echo running; wait"
    event = Event(name="to-cancel", script=script, grace_period=2)
    job = wait_for_output(executor, event, input={"dir": str(tmp_path)})
    running = [pid for path in pids.values() for pid in read_pids(path)]
    assert len(running) == 4 and all(alive(pid) for pid in running)
    cancelled_at = time.monotonic()
    job.cancel()
    result = job.result(timeout=30)
    assert time.monotonic() - cancelled_at < 2 + 5
    assert result.status == Status.CANCELLED
    assert set(result.summary["status"]) == {"cancelled"} and set(result.summary["error_kind"]) == {"cancelled"}
    assert wait_for(lambda: not any(alive(pid) for pid in running), timeout=10)
    assert executor.history().iloc[0]["status"] == "cancelled"
    after = executor.run(Event(name="after", script="echo again"))  # the pool and sessions still work
    assert after.ok and after.logs["line"].tolist() == ["again", "again"]


def test_api_mode_variables_outputs_and_tools_reach_the_executor_live(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    executor = local_executor(fleet.inventory)
    calls: list[tuple[str, str]] = []

    @executor.tools.register("greet")
    def greet(who: str) -> dict:
        calls.append(("greet", who))
        return {"greeting": f"hello {who}"}

    seen: list[tuple[str, str, object]] = []
    script = (
        "cronium.setVariable progress 1\n"
        'reply=$(cronium.tool greet "{\\"who\\": \\"$(cronium.event server)\\"}")\n'
        'echo "tool said $reply"\n'
        'cronium.output "$reply"\n'
        'cronium.setVariable progress "$(( $(cronium.getVariable progress) + 1 ))"\n'
    )
    result = executor.run(
        Event(name="api", script=script),
        api=True,
        callbacks=Callbacks(on_variable=lambda server, name, value: seen.append((server, name, value))),
    )
    assert result.status == Status.SUCCESS, result.summary.to_string()
    for name in fleet.names:
        assert result[name].helpers == "api"
        assert result.logs.query("server == @name")["line"].tolist() == [f'tool said {{"greeting":"hello {name}"}}']
        assert result[name].outputs == {"greeting": f"hello {name}"}
        assert result[name].variables["progress"] == 2
        assert [(n, v) for server, n, v in seen if server == name] == [("progress", 1), ("progress", 2)]
        # The forward's socket is gone with the last API-mode run of the connection.
        assert list(runner_dir(fleet, name).glob("api-*.sock")) == []
    assert sorted(calls) == [("greet", "srv-1"), ("greet", "srv-2")]
    assert executor.store.get_variables("global")["progress"] == 2
    assert sorted(result.tool_calls["server"]) == fleet.names and all(result.tool_calls["ok"])


def test_without_stream_local_forwarding_api_mode_falls_back_and_no_daemon_is_used(
    local_servers, local_executor
) -> None:
    fleet = local_servers(1)
    fleet["srv-1"].allow_stream_local = False  # sshd's AllowStreamLocalForwarding no
    executor = local_executor(fleet.inventory)
    script = 'cronium.setVariable mode bundled; echo "parent $(ps -o args= -p $PPID)"'
    result = executor.run(Event(name="fallback", script=script), api=True)
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert result["srv-1"].helpers.startswith("bundled (API unavailable: the server refused the forward")
    assert result["srv-1"].variables == {"mode": "bundled"}
    [line] = result.logs["line"].tolist()
    assert line.endswith("cronium-runner serve")  # a runner process of its own, not a daemon session


WHO_RUNS_ME = 'echo "session $PPID $(ps -o args= -p $PPID)"; echo "parent $(ps -o ppid= -p $PPID | tr -d " ")"'


def test_a_second_executor_goes_straight_to_the_runner_daemon(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(1)
    seen = []
    for _connection in range(2):  # two executors: two connections, one state dir
        executor = local_executor(fleet.inventory, state_dir=tmp_path / "shared-state")
        result = executor.run(Event(name="who-runs-me", script=WHO_RUNS_ME))
        assert result.ok, result.summary.to_string()
        seen.append((result["srv-1"].deploy, dict(line.split(" ", 1) for line in result.logs["line"])))
        executor.close()
    (deploy1, first), (deploy2, second) = seen
    assert (deploy1, deploy2) == ("deployed", "verified")  # the daemon vouched for the build
    assert " daemon --socket " in first["session"] and " daemon --socket " in second["session"]
    assert first["parent"] == second["parent"]  # one daemon
    assert first["session"] != second["session"]  # a session per connection
    daemon = int(first["parent"])
    assert alive(daemon) and "cronium-runner daemon" in cmdline(daemon)


def test_failures_to_connect_fail_only_their_server(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(1)
    good = fleet.server("srv-1")
    wrong_known_hosts = tmp_path / "wrong_known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    wrong_known_hosts.write_text(f"[127.0.0.1]:{good.port} {other_key}")
    stranger = tmp_path / "id_stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    inventory = Inventory(
        [
            good,
            fleet.server("srv-1", name="impostor", known_hosts=str(wrong_known_hosts)),
            fleet.server("srv-1", name="stranger", key_path=str(stranger)),
            fleet.server("srv-1", name="ghost", port=closed_port),
        ]
    )
    result = local_executor(inventory).run(Event(name="mixed", script="echo up"), servers="all")
    assert result.status == Status.PARTIAL, result.summary.to_string()
    assert result["srv-1"].status == Status.SUCCESS and result.logs["line"].tolist() == ["up"]
    assert {result[name].status for name in ("impostor", "stranger", "ghost")} == {Status.FAILED}
    assert result["impostor"].error.startswith(f"host key of {good.address} does not match")
    assert f"{good.address} refused our key" in result["stranger"].error
    kinds = {name: result[name].error_kind for name in ("srv-1", "impostor", "stranger", "ghost")}
    assert kinds == {"srv-1": None, "impostor": "host_key", "stranger": "auth", "ghost": "unreachable"}
    assert result["ghost"].error.startswith(f"cannot reach {good.user}@127.0.0.1:{closed_port}")
    assert "refused" in result["ghost"].error.lower()


def test_a_setup_step_that_stalls_fails_within_the_timeout_plus_grace(local_servers, local_executor) -> None:
    fleet = local_servers(2)
    fleet["srv-2"].stall_exec = True  # logs in, then no command ever starts
    started = time.monotonic()
    result = local_executor(fleet.inventory).run(Event(name="stall", script="echo ok", timeout=1, grace_period=0.5))
    assert time.monotonic() - started < 1 + 0.5 + 10
    assert result.status == Status.PARTIAL
    assert result["srv-1"].status == Status.SUCCESS
    assert result["srv-2"].status == Status.FAILED
    assert result["srv-2"].error.startswith("stalled while ") and result["srv-2"].error_kind == "timeout"
    assert "no progress within the event's timeout plus grace (1.5 s)" in result["srv-2"].error


def test_a_dropped_connection_fails_that_server_and_stops_its_script(
    local_servers, local_executor, tmp_path: Path
) -> None:
    fleet = local_servers(1)
    pids = tmp_path / "pids"
    executor = local_executor(fleet.inventory)
    job = wait_for_output(executor, Event(name="dropped", script=f"echo $$ > {pids}; echo running; sleep 5104"))
    [pid] = read_pids(pids)
    assert alive(pid)
    fleet["srv-1"].drop_connections()
    result = job.result(timeout=30)
    assert result["srv-1"].status == Status.FAILED
    assert "connection" in result["srv-1"].error.lower() and result["srv-1"].error_kind == "unreachable"
    assert wait_for(lambda: not alive(pid), timeout=15)  # the runner saw its input end
    again = executor.run(Event(name="after-drop", script="echo back"))  # a new connection
    assert again.ok and again.logs["line"].tolist() == ["back"]


def test_many_concurrent_events_on_one_server_share_a_bounded_pool(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory)
    jobs = [executor.submit(Event(name=f"many-{i}", script=f"sleep 0.3; echo job {i}")) for i in range(16)]
    results = [job.result(timeout=60) for job in jobs]
    assert [r.status for r in results] == [Status.SUCCESS] * 16, [r["srv-1"].error for r in results]
    assert [r.logs["line"].tolist() for r in results] == [[f"job {i}"] for i in range(16)]
    limit = executor.ssh_options.max_connections_per_server
    assert executor.pool.connection_count() <= limit and fleet["srv-1"].connection_count() <= limit


def test_stop_at_the_first_failure_cancels_the_others(local_servers, local_executor) -> None:
    fleet = local_servers(3)
    script = 'if [ "$(cronium.event server)" = srv-1 ]; then sleep 0.3; exit 2; fi; echo waiting; sleep 5105'
    result = local_executor(fleet.inventory).run(
        Event(name="first-failure", script=script, timeout=60, grace_period=1), continue_on_failure=False
    )
    assert result.status == Status.FAILED
    assert result["srv-1"].status == Status.FAILED and result["srv-1"].exit_code == 2
    assert result["srv-1"].error_kind == "script"
    assert {result[name].status for name in ("srv-2", "srv-3")} == {Status.CANCELLED}
    assert {result[name].error_kind for name in ("srv-2", "srv-3")} == {"cancelled"}
    for name in ("srv-2", "srv-3"):
        assert wait_for(lambda n=name: not [p for p in fleet[n].processes() if "sleep 5105" in cmdline(p)], 10)


def test_deploy_retries_until_the_server_lets_it(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    cache = fleet["srv-1"].home / ".cache"
    cache.write_text("")  # ~/.cache a plain file: the cache dir cannot be made; retrying may help
    failures: list[tuple[int, str]] = []

    def deploy_failed(server: str, attempt: int, reason: str) -> None:
        failures.append((attempt, reason))
        if attempt == 2:
            cache.unlink()

    result = local_executor(fleet.inventory).run(
        Event(name="retry", script="echo deployed"), callbacks=Callbacks(on_deploy_failed=deploy_failed)
    )
    assert result.ok, result.summary.to_string()
    assert [attempt for attempt, _ in failures] == [1, 2]
    assert result["srv-1"].attempts == 3 and result["srv-1"].deploy == "deployed"
    assert not list(runner_dir(fleet, "srv-1").glob(".partial-*"))


def test_an_unsafe_cache_directory_is_refused(local_servers, local_executor, tmp_path: Path) -> None:
    fleet = local_servers(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (fleet["srv-1"].home / ".cache").mkdir()
    (fleet["srv-1"].home / ".cache" / "cronium").symlink_to(elsewhere)
    result = local_executor(fleet.inventory).run(Event(name="unsafe", script="true"))
    assert result.status == Status.FAILED
    assert "unsafe directory" in result["srv-1"].error and "mode 700" in result["srv-1"].error
    assert result["srv-1"].error_kind == "deploy"
    assert list(elsewhere.iterdir()) == []


def test_run_async_from_another_event_loop(local_servers, local_executor) -> None:
    fleet = local_servers(1)
    executor = local_executor(fleet.inventory, ssh_options=SSHOptions(runner_daemon_idle_timeout=0))

    async def main():
        return await asyncio.gather(
            *(executor.run_async(Event(name="async", script=f"echo {shlex.quote(w)}")) for w in ("a", "b"))
        )

    results = asyncio.run(main())
    assert [r.logs["line"].tolist() for r in results] == [["a"], ["b"]]
    assert not [p for p in fleet["srv-1"].processes() if "cronium-runner daemon" in cmdline(p)]
