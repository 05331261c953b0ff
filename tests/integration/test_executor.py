"""The executor against the fleet: cached deployment, failures per server, timeouts and
cancellation that leave nothing running, dead links, concurrency."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import asyncssh
import pytest

import cronium_nb as cn
from cronium_nb import Event, Fleet, SSHOptions, Status
from cronium_nb.executor import Callbacks
from cronium_nb.model import Server
from cronium_nb.resources import runner_dist
from tests.runner_harness import leftover_processes, processes_matching, submit_and_wait_for_output, wait_for

pytestmark = pytest.mark.fleet


def test_first_run_deploys_then_the_cache_is_used(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    event = Event(name="uname", script='uname -m; cronium.output "$(uname -m)"')
    first = executor.run(event, servers="all")
    assert first.status == Status.SUCCESS, first.summary
    assert set(first.summary["deploy"]) <= {"deployed", "verified"}
    machines = {"amd64": "x86_64", "arm64": "aarch64"}
    assert first.outputs == {n: machines[cronium_fleet.member(n).arch] for n in cronium_fleet.names}
    sent = executor.metrics().set_index("metric")["value"]["deployments.bytes_sent"]
    second = executor.run(event, servers="all")
    assert second.status == Status.SUCCESS
    assert list(second.summary["deploy"]) == ["cached"] * len(cronium_fleet.names)
    assert list(second.summary["attempts"]) == [0] * len(cronium_fleet.names)
    metrics = executor.metrics().set_index("metric")["value"]
    assert metrics["deployments.bytes_sent"] == sent  # nothing uploaded the second time
    assert metrics["deployments.cached"] >= len(cronium_fleet.names)
    assert metrics["executions.success"] == 2
    history = executor.history()
    assert list(history["status"]) == ["success", "success"]
    logs = second.logs
    assert set(logs["server"]) == set(cronium_fleet.names) and set(logs["stream"]) == {"stdout"}


def test_a_new_executor_verifies_instead_of_uploading(cronium_fleet: Fleet, executor_factory) -> None:
    event = Event(name="verify", script="true")
    assert executor_factory(cronium_fleet.inventory).run(event, servers="amd64").ok
    again = executor_factory(cronium_fleet.inventory).run(event, servers="amd64")
    assert list(again.summary["deploy"]) == ["verified"]


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_runner_damaged_on_the_server_is_redeployed(cronium_fleet: Fleet, executor_factory, damage: str) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    event = Event(name="damaged", script="echo fine")
    assert executor.run(event, servers="all").ok
    command = {
        "delete": "rm -rf ~/.cache/cronium/runner",
        # Replaced, not rewritten in place: the idle runner session still executes this file,
        # and Linux refuses to open a running executable for writing (ETXTBSY).
        "corrupt": "for f in ~/.cache/cronium/runner/*/cronium-runner; do rm $f; echo junk > $f; done",
    }[damage]
    for name in cronium_fleet.names:
        assert cronium_fleet.exec(name, command).exit_code == 0
    result = executor.run(event, servers="all")
    assert result.status == Status.SUCCESS, result.summary.to_string()
    assert list(result.summary["deploy"]) == ["deployed"] * len(cronium_fleet.names)
    assert all(line == "fine" for line in result.logs["line"])


def test_a_server_of_an_architecture_without_a_build_fails_clearly(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path
) -> None:
    """The probe finds the machine before anything is sent: no build for it is that server's
    clear error, and the others run."""
    dist = tmp_path / "dist"
    dist.mkdir()
    info = json.loads((runner_dist() / "runner.json").read_text())
    info["binaries"] = {"amd64": info["binaries"]["amd64"]}
    (dist / "runner.json").write_text(json.dumps(info))
    shutil.copy(runner_dist() / "cronium-runner-linux-amd64", dist / "cronium-runner-linux-amd64")
    executor = executor_factory(cronium_fleet.inventory, runner_dist=dist)
    result = executor.run(Event(name="nothing-fits", script="true"))
    assert result.status == Status.PARTIAL
    assert result["amd64-1"].status == Status.SUCCESS
    assert result["arm64-1"].error == "no runner for architecture aarch64: the runner is built for linux/amd64"


def test_a_home_where_nothing_may_run_fails_with_the_reason(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=1, name_prefix="noexec-", tmpfs={"/root/.cache": "noexec,mode=0700"})
    executor = executor_factory(fleet.inventory)
    result = executor.run(Event(name="noexec", script="echo never"))
    assert result.status == Status.FAILED
    for server in fleet.names:
        error = result[server].error
        assert error.startswith("the runner cannot run on this server (")
        assert "Permission denied" in error
    assert result.logs.empty


def test_deploy_fails_twice_then_works(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="deploy-")
    name = fleet.names[0]
    # ~/.cache as a plain file: creating the cache dir fails, and retrying may help.
    assert fleet.exec(name, "rm -rf ~/.cache && touch ~/.cache").exit_code == 0
    failures: list[tuple[int, str]] = []

    def deploy_failed(server: str, attempt: int, reason: str) -> None:
        failures.append((attempt, reason))
        if attempt == 2:
            fleet.exec(name, "rm -f ~/.cache")

    executor = executor_factory(fleet.inventory)
    result = executor.run(
        Event(name="retry", script="echo deployed"), callbacks=Callbacks(on_deploy_failed=deploy_failed)
    )
    assert result.ok, result.summary.to_string()
    assert [attempt for attempt, _ in failures] == [1, 2]
    assert result[name].attempts == 3 and result[name].deploy == "deployed"
    assert executor.metrics().set_index("metric")["value"]["deployments.success"] == 1
    assert fleet.exec(name, "ls -A ~/.cache/cronium/runner | grep -c partial || true").output.strip() == "0"


def test_deploy_that_keeps_failing_reports_three_attempts(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="deployfail-")
    name = fleet.names[0]
    fleet.exec(name, "rm -rf ~/.cache && touch ~/.cache")
    try:
        result = executor_factory(fleet.inventory).run(Event(name="doomed", script="true"))
    finally:
        fleet.exec(name, "rm -f ~/.cache")
    assert result.status == Status.FAILED
    assert result[name].attempts == 0  # no attempt succeeded; the error counts them
    assert "deploying the runner failed 3 times" in result[name].error


def test_unsafe_cache_dir_is_refused(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, user="cronium", name_prefix="unsafe-")
    name = fleet.names[0]
    fleet.exec(
        name, "mkdir -p /home/cronium/.cache /tmp/elsewhere && ln -sfn /tmp/elsewhere /home/cronium/.cache/cronium"
    )
    try:
        result = executor_factory(fleet.inventory).run(Event(name="unsafe", script="true"))
    finally:
        fleet.exec(name, "rm -f ~/.cache/cronium", user="cronium")
    assert result.status == Status.FAILED
    assert "unsafe directory" in result[name].error and "mode 700" in result[name].error


def test_cache_dir_owned_by_another_user_is_refused(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, user="cronium", name_prefix="unsafe-")
    name = fleet.names[0]
    cache = "/home/cronium/.cache/cronium"
    fleet.exec(name, f"rm -rf {cache}; mkdir -p {cache} && chown intruder {cache} && chmod 700 {cache}")
    try:
        result = executor_factory(fleet.inventory).run(Event(name="intruded", script="true"))
    finally:
        fleet.exec(name, "rm -rf /home/cronium/.cache/cronium")
    assert result.status == Status.FAILED
    assert "unsafe directory" in result[name].error and "owned by cronium" in result[name].error


def test_partial_when_one_of_three_fails(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=2, arm64=1, name_prefix="three-")
    failing = fleet.names[1]
    script = f'if [ "$(cronium.event server)" = "{failing}" ]; then echo bad >&2; exit 1; fi; echo good'
    result = executor_factory(fleet.inventory).run(Event(name="partial", script=script))
    assert result.status == Status.PARTIAL
    rows = result.summary.set_index("server")
    assert rows.loc[failing, "status"] == "failed" and rows.loc[failing, "exit_code"] == 1
    assert rows.loc[failing, "error"] == "exit code 1"
    for other in set(fleet.names) - {failing}:
        assert rows.loc[other, "status"] == "success" and rows.loc[other, "exit_code"] == 0
    stderr = result.logs[result.logs["stream"] == "stderr"]
    assert list(stderr["server"]) == [failing] and list(stderr["line"]) == ["bad"]


def test_stop_at_first_failure(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=2, arm64=1, name_prefix="three-")
    first = fleet.names[0]
    script = f'if [ "$(cronium.event server)" = "{first}" ]; then exit 2; fi; sleep 5001'
    result = executor_factory(fleet.inventory).run(
        Event(name="first-failure", script=script, timeout=120), continue_on_failure=False
    )
    assert result[first].status == Status.FAILED
    assert {result[n].status for n in fleet.names[1:]} == {Status.CANCELLED}
    assert result.status == Status.FAILED
    for name in fleet.names:
        assert wait_for(lambda n=name: not processes_matching(fleet, n, r"sleep 5001"))


def test_unreachable_server_and_wrong_host_key_fail_only_themselves(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path
) -> None:
    real = cronium_fleet.servers[0]
    wrong_known_hosts = tmp_path / "known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    wrong_known_hosts.write_text(f"[127.0.0.1]:{real.port} {other_key}")
    with socket_closed_port() as port:
        ghost = Server(name="ghost", host="127.0.0.1", port=port, key_path=real.key_path, known_hosts=real.known_hosts)
        impostor = Server(
            name="impostor", host=real.host, port=real.port, key_path=real.key_path, known_hosts=str(wrong_known_hosts)
        )
        inventory = cn.Inventory([*cronium_fleet.servers, ghost, impostor])
        result = executor_factory(inventory).run(Event(name="mixed", script="echo up"), servers="all")
    assert result.status == Status.PARTIAL
    assert result["ghost"].status == Status.FAILED
    assert "cannot reach root@127.0.0.1" in result["ghost"].error and "refused" in result["ghost"].error.lower()
    assert result["impostor"].status == Status.FAILED
    assert "host key of root@127.0.0.1" in result["impostor"].error
    assert "does not match" in result["impostor"].error
    assert all(result[n].status == Status.SUCCESS for n in cronium_fleet.names)


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        pass


def test_wrong_client_key_and_changed_host_key_on_both_architectures(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path
) -> None:
    stranger = tmp_path / "id_stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    changed = tmp_path / "changed_known_hosts"
    lines = []
    servers = []
    for real in cronium_fleet.servers:
        other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
        lines.append(f"[127.0.0.1]:{real.port} {other_key}")
        servers.append(
            Server(name=f"nokey-{real.name}", host=real.host, port=real.port, key_path=str(stranger),
                   known_hosts=real.known_hosts)
        )  # fmt: skip
        servers.append(
            Server(name=f"newkey-{real.name}", host=real.host, port=real.port, key_path=real.key_path,
                   known_hosts=str(changed))
        )  # fmt: skip
    changed.write_text("".join(lines))
    result = executor_factory(cn.Inventory(servers)).run(Event(name="auth", script="true"))
    assert result.status == Status.FAILED
    for real in cronium_fleet.servers:
        assert "refused our key" in result[f"nokey-{real.name}"].error
        assert "does not match" in result[f"newkey-{real.name}"].error


def test_timeout_stops_everything(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    script = "sleep 5002 & setsid sleep 5003 & trap '' TERM; echo started; while true; do sleep 0.1; done"
    event = Event(name="slow", script=script, timeout=3, grace_period=2)
    started = time.monotonic()
    result = executor.run(event, servers="all")
    elapsed = time.monotonic() - started
    assert result.status == Status.TIMEOUT
    assert set(result.summary["status"]) == {"timeout"}
    assert elapsed < 3 + 2 + 15  # a hang would be the bug
    for name in cronium_fleet.names:
        assert processes_matching(cronium_fleet, name, r"sleep 500[23]|while true") == []
    assert executor.metrics().set_index("metric")["value"]["executions.timeout"] == 1


def test_cancel_during_the_run(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    running = threading.Event()
    seen: set[str] = set()

    def on_line(server: str, stream: str, text: str, ts: float) -> None:
        seen.add(server)
        if len(seen) == len(cronium_fleet.names):
            running.set()

    job = executor.submit(
        Event(name="to-cancel", script="sleep 5004 & echo running; wait", grace_period=2),
        servers="all",
        callbacks=Callbacks(on_line=on_line),
    )
    assert running.wait(60)
    cancelled_at = time.monotonic()
    job.cancel()
    result = job.result(timeout=60)
    assert time.monotonic() - cancelled_at < 2 + 10
    assert result.status == Status.CANCELLED
    assert set(result.summary["status"]) == {"cancelled"}
    for name in cronium_fleet.names:
        assert processes_matching(cronium_fleet, name, r"sleep 5004") == []
    assert executor.history().iloc[0]["status"] == "cancelled"


def test_cancel_during_the_deploy(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=0, arm64=1, name_prefix="canceldeploy-")
    name = fleet.names[0]
    executor = executor_factory(fleet.inventory)
    deploying = threading.Event()

    def on_status(result: cn.ServerResult) -> None:
        if result.phase == "deploy":
            deploying.set()

    job = executor.submit(Event(name="never", script="echo never"), callbacks=Callbacks(on_status=on_status))
    assert deploying.wait(60)
    job.cancel()
    result = job.result(timeout=30)
    assert result.status == Status.CANCELLED
    assert result[name].status == Status.CANCELLED
    assert result.logs.empty
    assert wait_for(lambda: not leftover_processes(fleet, name, r"tar xzf|sha256sum"))
    partial = fleet.exec(name, "ls -A ~/.cache/cronium/runner 2>/dev/null | grep -c partial || true")
    assert wait_for(lambda: partial.output.strip() == "0")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_paused_server_is_noticed_within_the_keepalive_bound(cronium_fleet_factory, executor_factory, arch) -> None:
    fleet = cronium_fleet_factory(amd64=int(arch == "amd64"), arm64=int(arch == "arm64"), name_prefix="pause-")
    name = fleet.names[0]
    options = SSHOptions(keepalive_interval=1, keepalive_count_max=3)
    executor = executor_factory(fleet.inventory, ssh_options=options)
    job = submit_and_wait_for_output(executor, Event(name="paused", script="echo running; sleep 5005"))
    fleet.pause(name)
    try:
        paused_at = time.monotonic()
        result = job.result(timeout=60)
        noticed = time.monotonic() - paused_at
    finally:
        fleet.unpause(name)
    assert result[name].status == Status.FAILED
    assert "connection" in result[name].error.lower()
    assert noticed < 3 * 1 + 10  # keepalive bound plus margin: a hang is the bug
    assert wait_for(lambda: not processes_matching(fleet, name, r"sleep 5005"), timeout=30)


def test_killing_sshd_mid_run_fails_that_server_cleanly(cronium_fleet_factory, executor_factory) -> None:
    fleet = cronium_fleet_factory(amd64=1, arm64=0, name_prefix="killsshd-")
    name = fleet.names[0]
    executor = executor_factory(fleet.inventory)
    job = submit_and_wait_for_output(executor, Event(name="sshd-dies", script="echo running; sleep 5006"))
    fleet.kill_sshd(name)
    try:
        result = job.result(timeout=60)
        assert result[name].status == Status.FAILED
        assert "connection" in result[name].error.lower()
        assert wait_for(lambda: not leftover_processes(fleet, name, r"sleep 5006"), timeout=30)
    finally:
        fleet.restart(name)
    assert executor.run(Event(name="after-restart", script="echo back")).ok


def test_thirty_concurrent_events_on_one_server(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    target = cronium_fleet.names[0]
    jobs = [
        executor.submit(Event(name=f"many-{i}", script=f"sleep 0.5; echo job {i}"), servers=[target]) for i in range(30)
    ]
    results = [job.result(timeout=300) for job in jobs]
    assert [r.status for r in results] == [Status.SUCCESS] * 30
    assert [r.logs["line"].tolist() for r in results] == [[f"job {i}"] for i in range(30)]
    assert executor.pool.connection_count() <= executor.ssh_options.max_connections_per_server


def test_run_async_from_another_loop(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)

    async def main():
        return await executor.run_async(Event(name="async", script="echo async"), servers="all")

    result = asyncio.run(main())
    assert result.ok and set(result.logs["line"]) == {"async"}


def test_bad_input_fails_before_any_connection(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    event = Event(name="fine", script="true")
    with pytest.raises(cn.UnknownServerError, match="unknown server or group 'nope'"):
        executor.submit(event, servers="nope")
    with pytest.raises(cn.EventError, match="timeout must be a positive"):
        executor.submit(event, servers="all", timeout=0)
    with pytest.raises(cn.EventError, match="input is not JSON-able"):
        executor.submit(event, servers="all", input={1, 2})
    with pytest.raises(TypeError, match=r"expected a cronium_nb\.Event"):
        executor.submit("echo hi", servers="all")
    assert executor.pool.connects == 0
    assert executor.history().empty


def test_secrets_are_redacted_and_never_on_the_command_line(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    secret = "hunter2-very-secret"
    event = Event(name="secretive", script='echo "token=$API_TOKEN"; sleep 1', secrets={"API_TOKEN": secret})
    name = cronium_fleet.names[0]
    job = executor.submit(event, servers=[name])
    seen = []
    assert wait_for(lambda: seen.append(cronium_fleet.exec(name, "ps -eo args").output) or "sleep 1" in seen[-1])
    result = job.result(timeout=60)
    assert result.ok
    assert list(result.logs["line"]) == ["token=***"]
    assert all(secret not in snapshot for snapshot in seen)
    payload_files = list((executor.state_dir / "storage" / "payloads").rglob("*.tar.gz"))
    assert payload_files and all(secret.encode() not in p.read_bytes() for p in payload_files)


def test_accept_new_records_a_first_key_and_refuses_a_changed_one(
    cronium_fleet: Fleet, executor_factory, tmp_path: Path
) -> None:
    real = cronium_fleet.servers[0]
    unknown = Server(
        name="fresh", host=real.host, port=real.port, key_path=real.key_path, known_hosts=str(tmp_path / "none")
    )
    inventory = cn.Inventory([unknown])
    strict = executor_factory(inventory).run(Event(name="strict", script="true"))
    assert strict.status == Status.FAILED and "no known_hosts file" in strict["fresh"].error
    recorded = tmp_path / "recorded_known_hosts"
    options = SSHOptions(host_key_policy="accept-new", accept_new_known_hosts=recorded)
    first = executor_factory(inventory, ssh_options=options).run(Event(name="tofu", script="true"))
    assert first.ok, first.summary.to_string()
    assert recorded.read_text().startswith(f"[127.0.0.1]:{real.port} ssh-ed25519 ")
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    recorded.write_text(f"[127.0.0.1]:{real.port} {other_key}")
    changed = executor_factory(inventory, ssh_options=options).run(Event(name="tofu", script="true"))
    assert changed.status == Status.FAILED and "does not match" in changed["fresh"].error
    with pytest.warns(UserWarning, match="host key checking is off"):
        unchecked = executor_factory(inventory, ssh_options=SSHOptions(host_key_policy="off")).run(
            Event(name="off", script="true")
        )
    assert unchecked.ok


def test_only_variables_a_run_changed_are_written_back(cronium_fleet: Fleet, executor_factory) -> None:
    executor = executor_factory(cronium_fleet.inventory)
    executor.store.set_variable("global", "untouched", 1, updated_by="the notebook")
    result = executor.run(Event(name="vars", script="cronium.setVariable touched 2"), servers="amd64")
    assert result.ok and result["amd64-1"].variables == {"untouched": 1, "touched": 2}
    frame = executor.store.variables("global").set_index("name")
    assert frame.loc["untouched", "updated_by"] == "the notebook"  # a given value is not rewritten
    assert frame.loc["touched", "updated_by"] == f"{result.execution_id}/amd64-1"


def test_connections_prefer_aes_gcm_and_the_ciphers_are_an_option(cronium_fleet: Fleet, executor_factory) -> None:
    event = Event(name="ciphers", script="echo hi")
    for ciphers, expected in ((SSHOptions().ciphers, "aes128-gcm@openssh.com"),
                              (("chacha20-poly1305@openssh.com",), "chacha20-poly1305@openssh.com")):  # fmt: skip
        executor = executor_factory(cronium_fleet.inventory, ssh_options=SSHOptions(ciphers=ciphers))
        assert executor.run(event).ok
        connections = executor.pool.connections()
        assert {pooled.target.port for pooled in connections} >= {s.port for s in cronium_fleet.servers}
        assert {(p.connection.get_extra_info("send_cipher"), p.connection.get_extra_info("recv_cipher"))
                for p in connections} == {(expected, expected)}  # fmt: skip
    with pytest.raises(ValueError, match="ciphers must name"):
        SSHOptions(ciphers=())
