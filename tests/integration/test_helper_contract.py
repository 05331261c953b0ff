"""Cronium's helper contract, one table run in bundled and in API mode on amd64 and arm64.

Each case is a script written as Cronium's users write them, the input it gets, and what must
come back: stdout lines, stderr lines, output and variables, exit code. Both modes must give the
same answers, so the expectations do not depend on the mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from cronium_nb import Event, Executor, Fleet, Status
from cronium_nb.resources import runner_dist

pytestmark = pytest.mark.fleet

COMPLEX_INPUT = {
    "name": "Ada Lovelace",
    "n": 3,
    "tags": ["a", "b"],
    "nested": {"k": [1, {"x": None, "quote": 'it\'s "ok"'}], "unicode": "zürich ✓"},
}
EVENT_FIELDS = ("id", "name", "type", "execution_id", "server", "payload_version", "runner_version", "timeout")
BIG = "x" * 200_000  # over the kernel's 128 KiB cap on one command-line argument
RUNNER_VERSION = json.loads((runner_dist() / "runner.json").read_text())["version"]


@dataclass
class Case:
    script: str
    type: str = "bash"
    stdout: list[str] = field(default_factory=list)  # "{server}" and "{execution_id}" are filled in
    stderr: list[str] = field(default_factory=list)
    outputs: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    input: Any = field(default_factory=lambda: COMPLEX_INPUT)


CASES: dict[str, Case] = {
    "input-key-as-text": Case(
        'echo "Hello $(cronium.input name), n=$(cronium.input n)"\ncronium.input tags\n',
        stdout=["Hello Ada Lovelace, n=3", '["a","b"]'],
    ),
    "input-whole-read-by-a-json-parser": Case(
        "cronium.input | python3 -c 'import json,sys; d = json.load(sys.stdin); "
        'print(d["nested"]["k"][1]["quote"], d["nested"]["unicode"], len(d))\'\n'
        'cronium.input nested | node -e \'let t=""; process.stdin.on("data", c => t += c)'
        '.on("end", () => console.log(JSON.parse(t).k.length))\'\n',
        stdout=['it\'s "ok" zürich ✓ 4', "2"],
    ),
    "input-missing-key": Case(
        'cronium.input nope\necho "exit=$?"\n',
        stdout=["exit=1"],
        stderr=["cronium.input: key 'nope' not found"],
    ),
    "input-none-at-all": Case(
        'echo "[$(cronium.input)]"\ncronium.input anything || echo "exit=$?"\n',
        input=None,
        stdout=["[null]", "exit=1"],
        stderr=["cronium.input: key 'anything' not found"],
    ),
    "output-whole-value": Case("cronium.output '{\"a\": [1, 2]}'\n", outputs={"a": [1, 2]}),
    "output-plain-text": Case("cronium.output 'all good, not json {'\n", outputs="all good, not json {"),
    "output-from-stdin": Case("printf '[1, \"two\"]' | cronium.output -\n", outputs=[1, "two"]),
    "output-keys": Case(
        "cronium.output result success\ncronium.output count 100\necho '{\"deep\": true}' | cronium.output data -\n",
        outputs={"result": "success", "count": 100, "data": {"deep": True}},
    ),
    "output-key-over-a-scalar": Case(
        'cronium.output 5\ncronium.output k v\necho "exit=$?"\n',
        outputs=5,
        stdout=["exit=1"],
        stderr=["cronium.output: the output is already set to a non-object value: cannot set key 'k'"],
    ),
    "variables": Case(
        "cronium.setVariable color blue\necho '{\"a\": [1]}' | cronium.setVariable cfg -\n"
        'echo "$(cronium.getVariable color) $(cronium.getVariable cfg)"\n'
        'out=$(cronium.getVariable nope); echo "exit=$? [$out]"\n',
        stdout=['blue {"a":[1]}', "exit=1 []"],
        stderr=["cronium.getVariable: variable 'nope' is not set"],
        variables={"color": "blue", "cfg": {"a": [1]}},
    ),
    "event-fields": Case(
        "".join(f'echo "{name}=$(cronium.event {name})"\n' for name in EVENT_FIELDS)
        + "cronium.event | python3 -c 'import json,sys; print(sorted(json.load(sys.stdin)) == sorted(sys.argv[1:]))' "
        + " ".join(EVENT_FIELDS)
        + "\n",
        stdout=[
            "id={event_id}",
            "name={event_name}",
            "type=bash",
            "execution_id={execution_id}",
            "server={server}",
            "payload_version={payload_version}",
            f"runner_version={RUNNER_VERSION}",
            "timeout=120",
            "True",
        ],
    ),
    "event-unknown-field": Case(
        'cronium.event bogus\necho "exit=$?"\n',
        stdout=["exit=1"],
        stderr=[f"cronium.event: unknown event field 'bogus'; known: {', '.join(EVENT_FIELDS)}"],
    ),
    "sh-script": Case(
        'set -e\nname=$(cronium.input name)\ncronium.output greeting "hi $name"\n'
        'cronium.output n "$(cronium.input n)"\n',
        type="sh",
        outputs={"greeting": "hi Ada Lovelace", "n": 3},
    ),
    "python-calls-the-shell-helpers": Case(
        "import json, subprocess\n"
        "for i, fruit in enumerate(['APPLE', 'BANANA']):\n"
        "    subprocess.run(['cronium.output', f'item_{i}', fruit], check=True)\n"
        "name = subprocess.run(['cronium.input', 'name'], capture_output=True, text=True, check=True).stdout\n"
        "missing = subprocess.run(['cronium.input', 'nope'], capture_output=True, text=True)\n"
        "print(name.strip(), missing.returncode, missing.stderr.strip())\n",
        type="python",
        stdout=["Ada Lovelace 1 cronium.input: key 'nope' not found"],
        outputs={"item_0": "APPLE", "item_1": "BANANA"},
    ),
    "python-object": Case(
        "cronium.output('result', 'success')\n"
        "cronium.output('count', cronium.input('n') * 10)\n"
        "print(cronium.input('nope'), cronium.input('nope', default='dflt'), cronium.input()['tags'])\n"
        "cronium.setVariable('big', 'x' * 200000)\n"
        "print(cronium.getVariable('unset'), len(cronium.getVariable('big')))\n"
        "print(cronium.event('id') == int(cronium.event()['id']), cronium.event('server'))\n"
        "try:\n    cronium.event('bogus')\nexcept ValueError as error:\n    print('error:', error)\n"
        "",
        type="python",
        stdout=[
            "None dflt ['a', 'b']",
            "None 200000",
            "True {server}",
            f"error: unknown event field 'bogus'; known: {', '.join(EVENT_FIELDS)}",
        ],
        outputs={"result": "success", "count": 30},
        variables={"big": BIG},
    ),
    "node-object": Case(
        'cronium.output("result", "success");\n'
        'cronium.output("count", cronium.input("n") * 10);\n'
        'console.log(cronium.input("nope"), cronium.input("nope", "dflt"), JSON.stringify(cronium.input().tags));\n'
        'cronium.setVariable("big", "x".repeat(200000));\n'
        'console.log(cronium.getVariable("unset"), cronium.getVariable("big").length);\n'
        'console.log(cronium.event("id") === cronium.event().id, cronium.event("server"));\n'
        'try { cronium.event("bogus"); } catch (error) { console.log("error:", error.message); }\n'
        'try { cronium.output("count", 1); cronium.output(7); cronium.output("k", 1); }\n'
        'catch (error) { console.log("error:", error.message.replace(/^cronium.output: /, "")); }\n'
        'cronium.output({ result: "success", count: 30 });\n',
        type="node",
        stdout=[
            'null dflt ["a","b"]',
            "null 200000",
            "true {server}",
            f"error: unknown event field 'bogus'; known: {', '.join(EVENT_FIELDS)}",
            "error: the output is already set to a non-object value: cannot set key 'k'",
        ],
        outputs={"result": "success", "count": 30},
        variables={"big": BIG},
    ),
}


def fill_in(line: str, values: dict[str, Any]) -> str:
    """``{name}`` placeholders replaced (not str.format: the lines hold JSON braces)."""
    for name, value in values.items():
        line = line.replace("{" + name + "}", str(value))
    return line


@pytest.fixture(scope="module")
def contract_executor(tmp_path_factory: pytest.TempPathFactory, cronium_fleet: Fleet):
    with Executor(cronium_fleet.inventory, state_dir=tmp_path_factory.mktemp("contract")) as executor:
        yield executor


@pytest.mark.parametrize("mode", ["bundled", "api"])
@pytest.mark.parametrize("name", list(CASES))
def test_helper_contract(cronium_fleet: Fleet, contract_executor: Executor, name: str, mode: str) -> None:
    case = CASES[name]
    event = Event(name=f"contract-{name}", script=case.script, type=case.type, timeout=120)
    contract_executor.variable_scope = f"{name}-{mode}"  # each case starts with no variables
    result = contract_executor.run(event, servers="all", input=case.input, api=mode == "api")
    summary = result.summary.to_string()
    assert result.status == (Status.SUCCESS if case.exit_code == 0 else Status.FAILED), summary
    history = contract_executor.history()
    row = history[history["execution_id"] == result.execution_id].iloc[0]
    for server in cronium_fleet.names:
        assert result[server].helpers == mode
        assert result[server].exit_code == case.exit_code
        fill = {
            "server": server,
            "execution_id": result.execution_id,
            "event_id": contract_executor.store.event_id(event.name),
            "event_name": event.name,
            "payload_version": row["payload_version"],
        }
        logs = result.logs.query("server == @server")
        expected = [fill_in(line, fill) for line in case.stdout]
        assert logs[logs["stream"] == "stdout"]["line"].tolist() == expected
        assert logs[logs["stream"] == "stderr"]["line"].tolist() == case.stderr
        assert result[server].outputs == case.outputs
        assert result[server].variables == case.variables


def test_a_long_value_never_reaches_a_command_line(cronium_fleet: Fleet, contract_executor: Executor) -> None:
    """Node's API-mode helpers hand values to the helper command on stdin: a 200 kB value would
    fail with E2BIG as an argument, and would be readable by every user through ps."""
    script = 'cronium.setVariable("secretish", "s3cr3t-" + "y".repeat(300000)); console.log("set");\n'
    result = contract_executor.run(Event(name="long-value", script=script, type="node"), servers="all", api=True)
    assert result.ok, result.summary.to_string()
    for server in cronium_fleet.names:
        assert len(result[server].variables["secretish"]) == 300007


def test_the_event_id_is_the_stores(contract_executor: Executor) -> None:
    first = contract_executor.run(Event(name="stable-id", script="cronium.output $(cronium.event id)"), servers="all")
    second = contract_executor.run(
        Event(name="stable-id", script="cronium.output $(cronium.event id) # changed"), servers="all"
    )
    event_id = contract_executor.store.event_id("stable-id")
    assert set(first.outputs.values()) == set(second.outputs.values()) == {event_id}


def test_outputs_survive_json_round_trip(contract_executor: Executor) -> None:
    result = contract_executor.run(
        Event(name="json-round-trip", script='cronium.output "$(cronium.input)"'), servers="all", input=COMPLEX_INPUT
    )
    assert all(value == COMPLEX_INPUT for value in result.outputs.values()), json.dumps(result.outputs)
