"""The ``cronium`` helper object for Python scripts, and the logic behind the shell helpers.

Scripts get it with no import (``cronium.input()``, ``cronium.output(x)``,
``cronium.getVariable(name)``, ``cronium.setVariable(name, value)``, ``cronium.event()`` and
snake_case aliases). Bundled mode keeps everything in JSON files in ``$CRONIUM_DIR``:
input.json, output.json, variables.json, event.json.

This file is copied next to the script on the server and must run on any python3 >= 3.8 with
the standard library only.
"""

import fcntl
import json
import os

INPUT_FILE = "input.json"
OUTPUT_FILE = "output.json"
VARIABLES_FILE = "variables.json"
EVENT_FILE = "event.json"


def parse_value(text):
    """A command-line value: JSON when it parses as JSON, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class Cronium:
    """Runtime helpers of one run. ``directory`` defaults to ``$CRONIUM_DIR``."""

    def __init__(self, directory=None):
        self._directory = directory

    @property
    def directory(self):
        directory = self._directory or os.environ.get("CRONIUM_DIR")
        if not directory:
            raise RuntimeError("cronium helpers need CRONIUM_DIR (they run inside cronium-runner)")
        return directory

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _read(self, name, default=None):
        try:
            with open(self._path(name), encoding="utf-8") as stream:
                return json.load(stream)
        except FileNotFoundError:
            return default

    def _write(self, name, value):
        temporary = self._path(f"{name}.tmp-{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(value, stream)
        os.replace(temporary, self._path(name))

    def input(self, key=None):
        """The run's input (``None`` when there is none), or one key of it."""
        data = self._read(INPUT_FILE)
        if key is None:
            return data
        return data.get(key) if isinstance(data, dict) else None

    def output(self, value):
        """Set the run's output value (anything JSON-able)."""
        json.dumps(value)  # refuse what cannot be reported, here, where the script can see it
        self._write(OUTPUT_FILE, value)

    def getVariable(self, name):
        """A variable's value, ``None`` when unset."""
        return self._read(VARIABLES_FILE, {}).get(name)

    def setVariable(self, name, value):
        """Set a variable (reported back to the orchestrator and kept in its store)."""
        if not isinstance(name, str) or not name:
            raise ValueError("variable name must be a non-empty string")
        json.dumps(value)
        with open(self._path(VARIABLES_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            variables = self._read(VARIABLES_FILE, {})
            variables[name] = value
            self._write(VARIABLES_FILE, variables)

    def event(self, field=None):
        """The event context (name, type, execution_id, server, ...), or one field of it."""
        data = self._read(EVENT_FILE, {})
        return data if field is None else data.get(field)

    get_variable = getVariable
    set_variable = setVariable


cronium = Cronium()
