"""Tool actions: scripts on the servers call Python callables registered in the notebook process."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from cronium_nb import Event, Executor, Fleet, Status

pytestmark = pytest.mark.fleet
SECRET = "hunter2-tool-secret"


@pytest.fixture(scope="module")
def tool_executor(tmp_path_factory: pytest.TempPathFactory, cronium_fleet: Fleet):
    with Executor(cronium_fleet.inventory, state_dir=tmp_path_factory.mktemp("tools")) as executor:
        release = asyncio.Event()

        def shout(msg: str, times: int = 1) -> dict:
            return {"upper": msg.upper() * times}

        async def double(n: int) -> int:
            await asyncio.sleep(0)
            return 2 * n

        def boom() -> None:
            raise RuntimeError("kaput")

        async def slow() -> str:
            await release.wait()  # never set: only the tool's timeout ends the call
            return "late"

        executor.tools.register("shout", shout)
        executor.tools.register("double", double)
        executor.tools.register("boom", boom)
        executor.tools.register("slow", slow, timeout=1)
        executor.tools.register("unserialisable", lambda: object())
        yield executor


def stderr_of(result, server: str) -> list[str]:
    logs = result.logs.query("server == @server and stream == 'stderr'")
    return logs["line"].tolist()


def test_a_script_uses_a_tools_result_in_every_language(cronium_fleet: Fleet, tool_executor: Executor) -> None:
    scripts = {
        "bash": 'r=$(cronium.tool shout \'{"msg": "done", "times": 2}\')\ncronium.output "$r"\n',
        "python": "cronium.output(cronium.tool('shout', {'msg': 'done', 'times': 2}))\n",
        "node": 'cronium.output(cronium.tool("shout", { msg: "done", times: 2 }));\n',
    }
    for script_type, script in scripts.items():
        result = tool_executor.run(Event(name=f"tool-{script_type}", script=script, type=script_type), api=True)
        assert result.ok, result.summary.to_string()
        assert result.outputs == {name: {"upper": "DONEDONE"} for name in cronium_fleet.names}
    # an async tool, its argument from stdin, a scalar result printed as itself
    result = tool_executor.run(Event(name="tool-async", script="echo '{\"n\": 21}' | cronium.tool double -"), api=True)
    assert result.ok
    assert set(result.logs["line"]) == {"42"}
    calls = result.tool_calls
    assert sorted(calls["server"]) == sorted(cronium_fleet.names)
    assert calls["tool"].tolist() == ["double", "double"]
    assert calls["ok"].all() and calls["error"].isna().all()
    assert calls["arguments"].tolist() == [{"n": 21}, {"n": 21}]
    assert (calls["duration_s"] >= 0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("cronium.tool nope '{}'", "cronium.tool: unknown tool 'nope' (known: boom, double, shout, slow, unser"),
        ("cronium.tool boom", "cronium.tool: tool 'boom' failed: RuntimeError: kaput"),
        ("cronium.tool slow", "cronium.tool: tool 'slow' did not answer within 1 s"),
        ("cronium.tool shout '{\"wrong\": 1}'", "cronium.tool: tool 'shout' failed: TypeError: "),
        ("cronium.tool shout '[1, 2]'", "cronium.tool: tool 'shout': arguments must be a JSON object"),
        ("cronium.tool shout 'not json'", "cronium.tool: tool arguments must be a JSON object"),
        ("cronium.tool unserialisable", "cronium.tool: tool 'unserialisable' returned a object, which is not JSON"),
    ],
)
def test_a_failing_call_is_the_scripts_clear_error(
    cronium_fleet: Fleet, tool_executor: Executor, call: str, message: str
) -> None:
    result = tool_executor.run(Event(name="tool-error", script=f'{call}\necho "exit=$?"\n'), api=True)
    assert result.ok, result.summary.to_string()  # the script went on and decided
    for server in cronium_fleet.names:
        assert result.logs.query("server == @server and stream == 'stdout'")["line"].tolist() == ["exit=1"]
        [line] = stderr_of(result, server)
        assert line.startswith(message)


def test_a_slow_tool_does_not_hold_up_other_runs(cronium_fleet: Fleet, tool_executor: Executor) -> None:
    slow = tool_executor.submit(Event(name="tool-slow", script='cronium.tool slow; echo "exit=$?"'), api=True)
    other = tool_executor.run(Event(name="tool-meanwhile", script="cronium.tool double '{\"n\": 1}'"), api=True)
    assert other.ok and set(other.logs["line"]) == {"2"}
    assert not slow.done()  # the other run finished while the slow call was still waiting
    assert set(slow.result(timeout=120).logs.query("stream == 'stdout'")["line"]) == {"exit=1"}


def test_bundled_mode_says_tools_need_api_mode(cronium_fleet: Fleet, tool_executor: Executor) -> None:
    result = tool_executor.run(Event(name="tool-bundled", script='cronium.tool shout \'{"msg": "x"}\''))
    assert result.status == Status.FAILED
    for server in cronium_fleet.names:
        assert result[server].exit_code == 1
        assert stderr_of(result, server) == [
            "cronium.tool: tool actions need API mode (run the event with api=True, or %%cronium --api)"
        ]
    assert result.tool_calls.empty


def test_calls_are_recorded_without_secret_arguments(cronium_fleet: Fleet, tool_executor: Executor) -> None:
    script = 'cronium.tool shout "{\\"msg\\": \\"$TOKEN\\"}" >/dev/null\ncronium.tool shout \'{"msg": "public"}\'\n'
    event = Event(name="tool-secret", script=script, secrets={"TOKEN": SECRET})
    result = tool_executor.run(event, api=True)
    assert result.ok, result.summary.to_string()
    calls = result.tool_calls
    assert len(calls) == 2 * len(cronium_fleet.names)
    assert calls["arguments"].tolist().count(None) == len(cronium_fleet.names)
    assert calls["arguments"].tolist().count({"msg": "public"}) == len(cronium_fleet.names)
    database = Path(tool_executor.state_dir) / "cronium.db"
    assert database.exists()
    for path in (database, database.with_name("cronium.db-wal")):
        if path.exists():
            assert SECRET.encode() not in path.read_bytes()


def test_a_tool_may_be_called_from_many_servers_at_once(cronium_fleet: Fleet, tool_executor: Executor) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def record(tag: str) -> str:
        with lock:
            seen.append(tag)
        return tag

    tool_executor.tools.register("record", record)
    script = 'for i in 1 2 3 4 5; do cronium.tool record "{\\"tag\\": \\"$(cronium.event server)-$i\\"}" & done; wait'
    result = tool_executor.run(Event(name="tool-parallel", script=script), api=True)
    assert result.ok
    assert sorted(seen) == sorted(f"{server}-{i}" for server in cronium_fleet.names for i in range(1, 6))
