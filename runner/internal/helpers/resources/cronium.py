"""The ``cronium`` helper object for Python scripts, and the logic behind the shell helpers.

Scripts get it with no import: ``cronium.input(key=None, default=None)``,
``cronium.output(value)`` / ``cronium.output(key, value)``, ``cronium.getVariable(name)``,
``cronium.setVariable(name, value)``, ``cronium.event(field=None)``, ``cronium.tool(name, args)``
(API mode only), and snake_case aliases. Bundled mode keeps everything in JSON files in
``$CRONIUM_DIR``: input.json, output.json, variables.json, event.json. API mode
(``$CRONIUM_API_SOCKET``, a Unix socket, and a token in the file ``$CRONIUM_API_TOKEN_FILE``)
asks the orchestrator's runtime service instead, through the SSH forward, so that variables set here are
seen there at once. The event context never changes during a run: it is read from event.json in
both modes.

This file is copied next to the script on the server and must run on any python3 >= 3.6 with
the standard library only.
"""

import fcntl
import json
import os

INPUT_FILE = "input.json"
OUTPUT_FILE = "output.json"
VARIABLES_FILE = "variables.json"
EVENT_FILE = "event.json"
LOCK_FILE = ".helpers.lock"
API_SOCKET_VARIABLE = "CRONIUM_API_SOCKET"
API_TOKEN_FILE_VARIABLE = "CRONIUM_API_TOKEN_FILE"
EVENT_FIELDS = ("id", "name", "type", "execution_id", "server", "payload_version", "runner_version", "timeout")
TOOLS_NEED_API = "tool actions need API mode (run the event with api=True, or %%cronium --api)"
_NO_BODY = object()
_UNSET = object()


class HelperError(ValueError):
    """A helper call the script got wrong, or that the orchestrator refused; the message says why."""


class _NotFound(Exception):
    """The runtime service has no such variable (404)."""


def _quote(text):
    import urllib.parse

    return urllib.parse.quote(text, safe="")


class _Api:
    """The orchestrator's runtime service: HTTP over the run's Unix socket (one connection per
    call, which is what the service expects)."""

    def __init__(self, socket_path, token_file, execution_id):
        with open(token_file, encoding="utf-8") as stream:
            self._token = stream.read().strip()
        self._socket_path = socket_path
        self._base = "/v1/executions/" + _quote(execution_id) + "/"

    def call(self, method, path, body=_NO_BODY, timeout=60):
        import http.client  # here: bundled mode, and the runner's own start-up, never need it
        import socket

        socket_path = self._socket_path

        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                self.sock.connect(socket_path)

        connection = UnixConnection("cronium-api", timeout=timeout)
        headers = {"Authorization": "Bearer " + self._token, "Content-Type": "application/json"}
        data = None if body is _NO_BODY else json.dumps(body).encode()
        try:
            connection.request(method, self._base + path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read()
        finally:
            connection.close()
        if response.status < 300:
            return json.loads(text or b"null")
        try:
            message = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            message = text.decode("utf-8", "replace").strip() or response.reason
        if response.status == 404 and path.startswith("variables/"):
            raise _NotFound(message)
        raise HelperError(message)


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
        if self._api_client is None and os.environ.get(API_SOCKET_VARIABLE):
            self._api_client = _Api(
                os.environ[API_SOCKET_VARIABLE],
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
        temporary = self._path(name + ".tmp-" + str(os.getpid()))
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(value, stream)
        os.replace(temporary, self._path(name))

    def _update(self, name, default, change):
        """Read-modify-write one data file under the run's helper lock (helpers may run at once)."""
        with open(self._path(LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._write(name, change(self._read(name, default)))

    # -- the helpers

    def input(self, key=None, default=None):
        """The run's input (``None`` when there is none), or one key of it (``default`` when the
        input has no such key)."""
        data = self._api.call("GET", "input") if self._api else self._read(INPUT_FILE)
        if key is None:
            return data
        return data[key] if isinstance(data, dict) and key in data else default

    def input_key(self, key):
        """One key of the input; :class:`HelperError` when it is missing (the shell form)."""
        found = self.input(key, default=_UNSET)
        if found is _UNSET:
            raise HelperError("key '" + key + "' not found")
        return found

    def output(self, *args):
        """``output(value)`` sets the run's whole output; ``output(key, value)`` sets one key of
        an output object. Values must be JSON-able."""
        if len(args) not in (1, 2):
            raise TypeError("cronium.output(value) or cronium.output(key, value)")
        value = args[-1]
        json.dumps(value)  # refuse what cannot be reported, here, where the script can see it
        if len(args) == 1:
            if self._api:
                self._api.call("PUT", "output", value)
            else:
                self._write(OUTPUT_FILE, value)
            return
        key = args[0]
        if not isinstance(key, str) or not key:
            raise HelperError("output key must be a non-empty string")
        if self._api:
            self._api.call("PUT", "output/" + _quote(key), value)
            return

        def set_key(current):
            return merge_output_key(current, key, value)

        self._update(OUTPUT_FILE, None, set_key)

    def getVariable(self, name):
        """A variable's value, ``None`` when unset."""
        return self.variable(name, default=None)

    def variable(self, name, default=_UNSET):
        """A variable's value; ``default`` when unset, or :class:`HelperError` without one."""
        if self._api:
            try:
                return self._api.call("GET", "variables/" + _quote(name))
            except _NotFound:
                found = _UNSET
        else:
            found = self._read(VARIABLES_FILE, {}).get(name, _UNSET)
        if found is _UNSET:
            if default is _UNSET:
                raise HelperError("variable '" + name + "' is not set")
            return default
        return found

    def setVariable(self, name, value):
        """Set a variable (reported back to the orchestrator and kept in its store)."""
        if not isinstance(name, str) or not name:
            raise HelperError("variable name must be a non-empty string")
        json.dumps(value)
        if self._api:
            self._api.call("PUT", "variables/" + _quote(name), value)
            return

        def set_name(variables):
            variables[name] = value
            return variables

        self._update(VARIABLES_FILE, {}, set_name)

    def event(self, field=None):
        """The event context (id, name, type, execution_id, server, payload_version,
        runner_version, timeout), or one field of it."""
        data = self._read(EVENT_FILE, {})
        if field is None:
            return data
        if field not in EVENT_FIELDS:
            raise HelperError("unknown event field '" + str(field) + "'; known: " + ", ".join(EVENT_FIELDS))
        return data.get(field)

    def tool(self, name, args=None):
        """Call the tool action ``name`` registered in the notebook (API mode only) with the
        JSON object ``args``; returns its JSON result."""
        if not isinstance(name, str) or not name:
            raise HelperError("tool name must be a non-empty string")
        if args is not None and not isinstance(args, dict):
            raise HelperError("tool arguments must be a JSON object")
        if not self._api:
            raise HelperError(TOOLS_NEED_API)
        # No client deadline: the service ends a call at the tool's timeout, the runner the
        # whole run at the event's.
        return self._api.call("POST", "tools/" + _quote(name), args or {}, timeout=None)

    get_variable = getVariable
    set_variable = setVariable


def merge_output_key(current, key, value):
    """The output after ``cronium.output KEY VALUE``: an object gets the key; no output yet
    becomes a new object; any other value set before is an error."""
    if current is None:
        current = {}
    if not isinstance(current, dict):
        raise HelperError("the output is already set to a non-object value: cannot set key '" + key + "'")
    current[key] = value
    return current


cronium = Cronium()
