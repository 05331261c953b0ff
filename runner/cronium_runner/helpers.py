"""Bundled-mode runtime helpers: the files a run's script sees, and the shell commands."""

from __future__ import annotations

import json
import os
import pkgutil
import shlex
import sys
from pathlib import Path
from typing import Any

from cronium_runner.resources.cronium import EVENT_FILE, INPUT_FILE, VARIABLES_FILE, Cronium, HelperError, parse_value

HELPER_DIR = ".cronium"
# Shell command name -> the `cronium-runner helper` verb it runs.
SHELL_HELPERS = {
    "cronium.input": "input",
    "cronium.output": "output",
    "cronium.getVariable": "getVariable",
    "cronium.setVariable": "setVariable",
    "cronium.event": "event",
    "cronium.tool": "tool",
}
RESOURCES = ("cronium.py", "bootstrap.py", "cronium.js")


def runner_command() -> list[str]:
    """How to start this same runner again (for the shell helper commands)."""
    if getattr(sys, "frozen", False):  # PyInstaller bundle
        return [sys.executable]
    entry = os.path.abspath(sys.argv[0])
    if entry.endswith(".pyz") or (os.path.isfile(entry) and not entry.endswith(".py")):
        return [sys.executable, entry]
    return [sys.executable, "-m", "cronium_runner"]


def install_programs(helper_dir: Path) -> Path:
    """Write the helper programs (resources and shell commands) into ``helper_dir``, which must
    not exist yet; return its bin dir. They hold no per-run data (that is in ``$CRONIUM_DIR``),
    so one copy serves every run of a runner session."""
    bin_dir = helper_dir / "bin"
    helper_dir.mkdir(mode=0o700)
    bin_dir.mkdir(mode=0o700)
    for name in RESOURCES:
        data = pkgutil.get_data("cronium_runner.resources", name)
        assert data is not None
        (helper_dir / name).write_bytes(data)
    command = " ".join(shlex.quote(part) for part in runner_command())
    for name, verb in SHELL_HELPERS.items():
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} helper {verb} "$@"\n')
        shim.chmod(0o700)
    return bin_dir


def write_run_data(workdir: Path, *, input_value: Any, variables: dict[str, Any], event: dict[str, Any]) -> None:
    """The run's own helper data files."""
    for name, value in ((INPUT_FILE, input_value), (VARIABLES_FILE, variables), (EVENT_FILE, event)):
        (workdir / name).write_text(json.dumps(value), encoding="utf-8")


def interpreter_argv(script_type: str, interpreter: str, helper_dir: Path, entrypoint: str) -> list[str]:
    if script_type == "python":
        return [interpreter, str(helper_dir / "bootstrap.py"), entrypoint]
    if script_type == "node":
        return [interpreter, "--require", str(helper_dir / "cronium.js"), entrypoint]
    return [interpreter, entrypoint]


# verb -> (fewest arguments, most arguments, usage)
USAGE = {
    "input": (0, 1, "cronium.input [KEY]"),
    "output": (1, 2, "cronium.output VALUE|-  or  cronium.output KEY VALUE|-"),
    "getVariable": (1, 1, "cronium.getVariable NAME"),
    "setVariable": (2, 2, "cronium.setVariable NAME VALUE|-"),
    "event": (0, 1, "cronium.event [FIELD]"),
    "tool": (1, 2, "cronium.tool NAME [JSON|-]"),
}
_MISSING = object()


def _print_value(value: Any, envelope: bool) -> None:
    """Strings print as themselves (handy in shell), everything else as compact JSON.

    ``envelope`` (``--json``, for the Node helpers): ``{"value": V}``, or ``{}`` for a missing
    input key or an unset variable, so that the caller can tell them from an error."""
    if envelope:
        print(json.dumps({} if value is _MISSING else {"value": value}, separators=(",", ":")))
    elif isinstance(value, str):
        print(value)
    else:
        print(json.dumps(value, separators=(",", ":")))


def run_helper(verb: str, args: list[str]) -> int:
    """``cronium-runner helper VERB ARGS``: the shell helpers. Returns the exit code."""
    helpers = Cronium()
    envelope = bool(args) and args[0] == "--json"
    if envelope:
        args = args[1:]
    if verb not in USAGE:
        print(f"cronium-runner: unknown helper {verb!r}", file=sys.stderr)
        return 64
    low, high, text = USAGE[verb]
    if not low <= len(args) <= high:
        print(f"usage: {text}", file=sys.stderr)
        return 64

    def value_argument(text_value: str) -> Any:
        return parse_value(sys.stdin.read() if text_value == "-" else text_value)

    # In the envelope form a missing key or variable is an answer, not an error.
    try:
        if verb == "input":
            if not args:
                _print_value(helpers.input(), envelope)
            elif envelope:
                _print_value(helpers.input(args[0], default=_MISSING), envelope)
            else:
                _print_value(helpers.input_key(args[0]), envelope)
        elif verb == "output":
            helpers.output(*args[:-1], value_argument(args[-1]))
        elif verb == "getVariable":
            found = helpers.variable(args[0], default=_MISSING) if envelope else helpers.variable(args[0])
            _print_value(found, envelope)
        elif verb == "setVariable":
            helpers.setVariable(args[0], value_argument(args[1]))
        elif verb == "event":
            _print_value(helpers.event(*args), envelope)
        else:
            arguments = value_argument(args[1]) if len(args) > 1 else None
            if isinstance(arguments, str):
                raise HelperError("tool arguments must be a JSON object")
            _print_value(helpers.tool(args[0], arguments), envelope)
    except (RuntimeError, ValueError, OSError) as error:  # urllib's errors are OSErrors
        print(f"cronium.{verb}: {error}", file=sys.stderr)
        return 1
    return 0
