"""API mode: the runtime service that scripts reach through an SSH reverse tunnel.

The service is an aiohttp app on 127.0.0.1 and a free port, inside the executor's process and
loop. Each server of an API-mode execution gets a short-lived HS256 JWT naming the execution,
the event and the server; a request with no token, a forged or expired one is refused with 401,
a valid token used for another execution with 403. The token travels on the runner's stdin
and is kept in a 0600 file on the server: never on a command line, in a manifest or a log.

Endpoints (all under ``/v1/executions/{execution_id}``, JSON bodies and answers; errors are
``{"error": message}``): ``GET input``, ``PUT output``, ``PUT output/{key}`` (one key of an
output object), ``GET variables/{name}`` (404 when unset), ``PUT variables/{name}``,
``POST tools/{name}`` (a tool action, see :mod:`cronium_nb.tools`). The event context is not
served: it is fixed for the run and the helpers read it from the run's event.json.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web

from cronium_nb.tools import ToolError, ToolRegistry

TOKEN_MARGIN_S = 300.0  # a token outlives the run's timeout by this much
ALGORITHM = "HS256"


@dataclass
class ApiRun:
    """What the service knows and collects for one server of one execution."""

    execution_id: str
    server: str
    event_name: str
    input: Any
    variables: dict[str, Any]
    on_variable: Callable[[str, Any], None] | None = None  # live: (name, value) as it is set
    # each tool call, once answered: (tool, arguments, started_at, duration_s, error or None)
    on_tool_call: Callable[[str, Any, float, float, str | None], None] | None = None
    output: Any = None
    output_set: bool = False


RUN_KEY = web.RequestKey("run", ApiRun)
TOOL_ERROR_STATUS = {"unknown": 404, "bad_arguments": 400, "failed": 502, "timeout": 504}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class RuntimeService:
    """The HTTP runtime API of one executor."""

    def __init__(self, tools: ToolRegistry | None = None) -> None:
        self.tools = tools or ToolRegistry()
        self._secret = secrets.token_bytes(32)
        self._runs: dict[tuple[str, str], ApiRun] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen on 127.0.0.1 and a free port (once); returns the port."""
        if self._runner is None:
            app = web.Application(middlewares=[self._authenticate], client_max_size=16 * 1024 * 1024)
            prefix = "/v1/executions/{execution_id}"
            app.add_routes(
                [
                    web.get(f"{prefix}/input", self._get_input),
                    web.put(f"{prefix}/output", self._put_output),
                    web.put(f"{prefix}/output/{{key}}", self._put_output_key),
                    web.get(f"{prefix}/variables/{{name}}", self._get_variable),
                    web.put(f"{prefix}/variables/{{name}}", self._put_variable),
                    web.post(f"{prefix}/tools/{{name}}", self._call_tool),
                ]
            )
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._runner = runner
        assert self.port is not None
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- runs and tokens

    def register(self, run: ApiRun, timeout: float) -> str:
        """Accept requests for ``run`` and return its token."""
        self._runs[(run.execution_id, run.server)] = run
        now = int(time.time())
        claims = {
            "exec": run.execution_id,
            "srv": run.server,
            "evt": run.event_name,
            "iat": now,
            "exp": now + int(timeout + TOKEN_MARGIN_S),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def unregister(self, execution_id: str, server: str) -> ApiRun | None:
        return self._runs.pop((execution_id, server), None)

    def token_for_test(self, claims: dict[str, Any]) -> str:
        """A token with arbitrary claims signed by this service (for tests of the checks)."""
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise web.HTTPUnauthorized(text="missing bearer token")
        try:
            claims = jwt.decode(
                header[len("Bearer ") :],
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "exec", "srv"]},
            )
        except jwt.ExpiredSignatureError:
            raise web.HTTPUnauthorized(text="token expired") from None
        except jwt.InvalidTokenError:
            raise web.HTTPUnauthorized(text="invalid token") from None
        execution_id = request.match_info.get("execution_id")
        run = self._runs.get((claims["exec"], claims["srv"]))
        if claims["exec"] != execution_id or run is None:
            raise web.HTTPForbidden(text="token is not for this execution")
        request[RUN_KEY] = run
        return await handler(request)

    # -- endpoints

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None

    async def _get_input(self, request: web.Request) -> web.Response:
        return web.json_response(request[RUN_KEY].input)

    async def _put_output(self, request: web.Request) -> web.Response:
        run: ApiRun = request[RUN_KEY]
        run.output, run.output_set = await self._body(request), True
        return web.json_response({"ok": True})

    async def _put_output_key(self, request: web.Request) -> web.Response:
        run: ApiRun = request[RUN_KEY]
        key = request.match_info["key"]
        value = await self._body(request)
        current = run.output if run.output_set else None
        if current is None:
            current = {}
        if not isinstance(current, dict):
            # The same words as the bundled helpers' (cronium.py merge_output_key).
            return error_response(409, f"the output is already set to a non-object value: cannot set key '{key}'")
        current[key] = value
        run.output, run.output_set = current, True
        return web.json_response({"ok": True})

    async def _get_variable(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        variables = request[RUN_KEY].variables
        if name not in variables:
            return error_response(404, f"variable '{name}' is not set")
        return web.json_response(variables[name])

    async def _call_tool(self, request: web.Request) -> web.Response:
        run: ApiRun = request[RUN_KEY]
        name = request.match_info["name"]
        arguments = await self._body(request)
        started, clock = time.time(), time.monotonic()
        try:
            result = await self.tools.call(name, arguments)
        except ToolError as error:
            self._record_tool_call(run, name, arguments, started, time.monotonic() - clock, str(error))
            return error_response(TOOL_ERROR_STATUS[error.kind], str(error))
        self._record_tool_call(run, name, arguments, started, time.monotonic() - clock, None)
        return web.json_response(result)

    @staticmethod
    def _record_tool_call(
        run: ApiRun, name: str, arguments: Any, started: float, duration_s: float, error: str | None
    ) -> None:
        if run.on_tool_call is not None:
            run.on_tool_call(name, arguments, started, duration_s, error)

    async def _put_variable(self, request: web.Request) -> web.Response:
        run: ApiRun = request[RUN_KEY]
        name = request.match_info["name"]
        value = await self._body(request)
        run.variables[name] = value
        if run.on_variable is not None:
            run.on_variable(name, value)
        return web.json_response({"ok": True})
