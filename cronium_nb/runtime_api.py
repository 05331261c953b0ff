"""API mode: the runtime service that scripts reach through an SSH reverse tunnel.

The service is an aiohttp app on 127.0.0.1 and a free port, inside the executor's process and
loop. Each server of an API-mode execution gets a short-lived HS256 JWT naming the execution,
the event and the server; a request with no token, a forged or expired one is refused with 401,
a valid token used for another execution with 403. The token travels on the runner's stdin
and is kept in a 0600 file on the server: never on a command line, in a manifest or a log.

Endpoints (all under ``/v1/executions/{execution_id}``, JSON bodies and answers):
``GET input``, ``PUT output``, ``GET event``, ``GET variables/{name}``, ``PUT variables/{name}``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web

TOKEN_MARGIN_S = 300.0  # a token outlives the run's timeout by this much
ALGORITHM = "HS256"


@dataclass
class ApiRun:
    """What the service knows and collects for one server of one execution."""

    execution_id: str
    server: str
    event: dict[str, Any]
    input: Any
    variables: dict[str, Any]
    on_variable: Callable[[str, Any], None] | None = None  # live: (name, value) as it is set
    output: Any = None
    output_set: bool = False


RUN_KEY = web.RequestKey("run", ApiRun)


class RuntimeService:
    """The HTTP runtime API of one executor."""

    def __init__(self) -> None:
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
                    web.get(f"{prefix}/event", self._get_event),
                    web.get(f"{prefix}/variables/{{name}}", self._get_variable),
                    web.put(f"{prefix}/variables/{{name}}", self._put_variable),
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
            "evt": run.event.get("name"),
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

    async def _get_event(self, request: web.Request) -> web.Response:
        return web.json_response(request[RUN_KEY].event)

    async def _get_variable(self, request: web.Request) -> web.Response:
        return web.json_response(request[RUN_KEY].variables.get(request.match_info["name"]))

    async def _put_variable(self, request: web.Request) -> web.Response:
        run: ApiRun = request[RUN_KEY]
        name = request.match_info["name"]
        value = await self._body(request)
        run.variables[name] = value
        if run.on_variable is not None:
            run.on_variable(name, value)
        return web.json_response({"ok": True})
