"""The ``cronium`` helper object for Python scripts, and the logic behind the shell helpers.

Scripts get it with no import (``cronium.input()``, ``cronium.output(x)``,
``cronium.getVariable(name)``, ``cronium.setVariable(name, value)``, ``cronium.event()`` and
snake_case aliases). Bundled mode keeps everything in JSON files in ``$CRONIUM_DIR``:
input.json, output.json, variables.json, event.json. API mode (``$CRONIUM_API_URL`` and a token
in the file ``$CRONIUM_API_TOKEN_FILE``) asks the orchestrator's runtime service instead, through
the SSH tunnel, so that variables set here are seen there at once.

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
API_URL_VARIABLE = "CRONIUM_API_URL"
API_TOKEN_FILE_VARIABLE = "CRONIUM_API_TOKEN_FILE"
_NO_BODY = object()


def _quote(text):
    import urllib.parse

    return urllib.parse.quote(text, safe="")


class _Api:
    """The orchestrator's runtime service (stdlib HTTP; proxies ignored, it is on loopback)."""

    def __init__(self, url, token_file, execution_id):
        import urllib.request  # here: bundled mode, and the runner's own start-up, never need it

        with open(token_file, encoding="utf-8") as stream:
            self._token = stream.read().strip()
        self._base = f"{url.rstrip('/')}/v1/executions/{_quote(execution_id)}/"
        self._request = urllib.request.Request
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method, path, body=_NO_BODY):
        data = None if body is _NO_BODY else json.dumps(body).encode()
        request = self._request(self._base + path, data=data, method=method)
        request.add_header("Authorization", "Bearer " + self._token)
        request.add_header("Content-Type", "application/json")
        with self._opener.open(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


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
        self._api_client = None

    @property
    def _api(self):
        """The API client in API mode, else None."""
        if self._api_client is None and os.environ.get(API_URL_VARIABLE):
            self._api_client = _Api(
                os.environ[API_URL_VARIABLE],
                os.environ[API_TOKEN_FILE_VARIABLE],
                os.environ.get("CRONIUM_EXECUTION_ID", ""),
            )
        return self._api_client

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
        data = self._api.call("GET", "input") if self._api else self._read(INPUT_FILE)
        if key is None:
            return data
        return data.get(key) if isinstance(data, dict) else None

    def output(self, value):
        """Set the run's output value (anything JSON-able)."""
        json.dumps(value)  # refuse what cannot be reported, here, where the script can see it
        if self._api:
            self._api.call("PUT", "output", value)
        else:
            self._write(OUTPUT_FILE, value)

    def getVariable(self, name):
        """A variable's value, ``None`` when unset."""
        if self._api:
            return self._api.call("GET", "variables/" + _quote(name))
        return self._read(VARIABLES_FILE, {}).get(name)

    def setVariable(self, name, value):
        """Set a variable (reported back to the orchestrator and kept in its store)."""
        if not isinstance(name, str) or not name:
            raise ValueError("variable name must be a non-empty string")
        json.dumps(value)
        if self._api:
            self._api.call("PUT", "variables/" + _quote(name), value)
            return
        with open(self._path(VARIABLES_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            variables = self._read(VARIABLES_FILE, {})
            variables[name] = value
            self._write(VARIABLES_FILE, variables)

    def event(self, field=None):
        """The event context (name, type, execution_id, server, ...), or one field of it."""
        data = self._api.call("GET", "event") if self._api else self._read(EVENT_FILE, {})
        return data if field is None else data.get(field)

    get_variable = getVariable
    set_variable = setVariable


cronium = Cronium()
