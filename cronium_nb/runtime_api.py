"""API mode: the runtime service that scripts reach through an SSH stream-local forward.

The service is an aiohttp app on a Unix socket in a private (0700) temporary directory, inside
the executor's process and loop; each connection that carries API-mode runs forwards a Unix
socket in the run user's private runner directory on the server to it (see
:mod:`cronium_nb.ssh.api_forward`), so no other user of either machine can reach it. It caps
its connections (``MAX_CONNECTIONS``) and drops one that has not sent a whole request within
``REQUEST_HEAD_TIMEOUT_S``; a connection serves one request (the helpers open one per call).

Each server of an API-mode execution gets a short-lived HS256 JWT naming the execution, the
event and the server; a request with no token, a forged or expired one is refused with 401,
a valid token used for another execution with 403. The token travels on the runner's stdin
and is kept in a 0600 file on the server: never on a command line, in a manifest or a log.

Endpoints (all under ``/v1/executions/{execution_id}``, JSON bodies and answers; errors are
``{"error": message}``): ``GET input``, ``PUT output``, ``PUT output/{key}`` (one key of an
output object), ``GET variables/{name}`` (404 when unset), ``PUT variables/{name}``,
``POST tools/{name}`` (a tool action, see :mod:`cronium_nb.tools`). The event context is not
served: it is fixed for the run and the helpers read it from the run's event.json.

aiohttp is imported when the service starts (the first API-mode run), not with this module: an
executor constructs its service up front, and most never serve a request.

The directory holds an ``owner`` file (host, pid, start time of the process). A process that ends
without closing its service (a killed kernel) leaves its directory behind; the next service this
user starts on the machine removes every such directory whose owner is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jwt

from cronium_nb.model import variable_too_deep
from cronium_nb.store import current_owner, owner_ended
from cronium_nb.tools import ToolError, ToolRegistry

if TYPE_CHECKING:
    from aiohttp import web

TOKEN_MARGIN_S = 300.0  # a token outlives the run's timeout by this much
MAX_CONNECTIONS = 512
REQUEST_HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
SOCKET_NAME = "runtime.sock"
DIRECTORY_PREFIX = "cronium-api-"  # in the temporary directory (tempfile.gettempdir())
OWNER_FILE = "owner"
ALGORITHM = "HS256"


def remove_stale_directories() -> int:
    """Remove this user's service directories that a process left behind; returns how many.

    Only a real directory of this user counts (not a link, whoever made it), and only when its
    owner file names a process of this machine that has ended and nothing answers on its socket:
    a service in another pid namespace sharing this temporary directory (a container of the same
    pod) looks ended from here but still listens. A directory with no owner file yet (a service
    starting now) is left alone."""
    removed = 0
    for directory in Path(tempfile.gettempdir()).glob(f"{DIRECTORY_PREFIX}*"):
        with contextlib.suppress(OSError):  # another user's (0700), or removed meanwhile
            status = directory.lstat()
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
                continue
            if owner_ended(_read_owner(directory / OWNER_FILE)) and not _answers(directory / SOCKET_NAME):
                shutil.rmtree(directory)
                removed += 1
    return removed


def _read_owner(path: Path) -> str:
    """The owner file's text: a regular file only (no link, FIFO or device), its first bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return ""
        return os.read(descriptor, 256).decode("ascii", errors="replace")
    finally:
        os.close(descriptor)


def _answers(path: Path) -> bool:
    """Whether something listens on the Unix socket at ``path`` (a missing one does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # cannot tell: keep it
        return True


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


TOOL_ERROR_STATUS = {"unknown": 404, "bad_arguments": 400, "failed": 502, "timeout": 504}


def json_response(data: Any, status: int = 200) -> web.Response:
    from aiohttp import web

    return web.json_response(data, status=status)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


def _run_of(request: web.Request) -> ApiRun:
    """The :class:`ApiRun` an authenticated request carries."""
    from cronium_nb._request_keys import RUN_KEY

    return request[RUN_KEY]


class _GuardedConnection(asyncio.Protocol):
    """One connection to the service: aiohttp's request handler behind a connection cap and a
    deadline for the first request's head."""

    def __init__(self, service: RuntimeService, handler: asyncio.Protocol) -> None:
        self._service, self._handler = service, handler
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport; asyncio.Protocol types it as the base, which has no abort.
        transport = cast(asyncio.Transport, transport)
        service = self._service
        service.open_connections += 1
        if service.open_connections > service.max_connections:
            service.refused_connections += 1
            transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(service.head_timeout, self._expire, transport)
        self._admitted = True
        self._handler.connection_made(transport)

    def _expire(self, transport: asyncio.Transport) -> None:
        if transport not in self._service.served:
            self._service.expired_connections += 1
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.open_connections -= 1
        if self._timer is not None:
            self._timer.cancel()
        if self._admitted:
            self._handler.connection_lost(exc)


class RuntimeService:
    """The HTTP runtime API of one executor."""

    def __init__(
        self,
        tools: ToolRegistry | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = REQUEST_HEAD_TIMEOUT_S,
    ) -> None:
        self.tools = tools or ToolRegistry()
        self.max_connections, self.head_timeout = max_connections, head_timeout
        self._secret = secrets.token_bytes(32)
        self._runs: dict[tuple[str, str], ApiRun] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._directory: Path | None = None
        self._starting = asyncio.Lock()  # a fan-out's servers ask for the service at once
        self.path: Path | None = None
        # transports that got at least as far as a request; counters for tests and metrics
        self.served: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self.open_connections = self.refused_connections = self.expired_connections = 0

    async def start(self) -> Path:
        """Listen on a Unix socket in a new private directory (once); returns its path."""
        async with self._starting:
            if self._runner is None:
                await self._listen()
        assert self.path is not None
        return self.path

    async def _listen(self) -> None:
        """The application, its private directory (stale ones of ended processes swept first)
        and the socket."""
        from aiohttp import web

        @web.middleware
        async def authenticate(request: web.Request, handler: Callable) -> web.StreamResponse:
            return await self._authenticate(request, handler)

        app = web.Application(middlewares=[authenticate], client_max_size=16 * 1024 * 1024)
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
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=0)
        await runner.setup()
        assert runner.server is not None
        handler_factory = runner.server
        await asyncio.to_thread(remove_stale_directories)  # file system and socket probes
        self._directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))  # 0700
        (self._directory / OWNER_FILE).write_text(current_owner())
        self.path = self._directory / SOCKET_NAME
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _GuardedConnection(self, handler_factory()), str(self.path)
        )
        self.path.chmod(0o600)
        self._runner = runner

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

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

    async def _authenticate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        from aiohttp import web

        if request.transport is not None:
            self.served.add(request.transport)
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
        from cronium_nb._request_keys import RUN_KEY

        request[RUN_KEY] = run
        return await handler(request)

    # -- endpoints

    @staticmethod
    async def _body(request: web.Request) -> Any:
        """The request's JSON body, read within ``BODY_TIMEOUT_S`` (a body sent byte by byte
        must not hold a connection, past the head deadline, for ever)."""
        from aiohttp import web

        try:
            return await asyncio.wait_for(request.json(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"body not received within {BODY_TIMEOUT_S:g} s") from None
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text="body must be JSON") from None

    async def _get_input(self, request: web.Request) -> web.Response:
        return json_response(_run_of(request).input)

    async def _put_output(self, request: web.Request) -> web.Response:
        run: ApiRun = _run_of(request)
        run.output, run.output_set = await self._body(request), True
        return json_response({"ok": True})

    async def _put_output_key(self, request: web.Request) -> web.Response:
        run: ApiRun = _run_of(request)
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
        return json_response({"ok": True})

    async def _get_variable(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        variables = _run_of(request).variables
        if name not in variables:
            return error_response(404, f"variable '{name}' is not set")
        return json_response(variables[name])

    async def _call_tool(self, request: web.Request) -> web.Response:
        run: ApiRun = _run_of(request)
        name = request.match_info["name"]
        arguments = await self._body(request)
        started, clock = time.time(), time.monotonic()
        try:
            result = await self.tools.call(name, arguments)
        except ToolError as error:
            self._record_tool_call(run, name, arguments, started, time.monotonic() - clock, str(error))
            return error_response(TOOL_ERROR_STATUS[error.kind], str(error))
        self._record_tool_call(run, name, arguments, started, time.monotonic() - clock, None)
        return json_response(result)

    @staticmethod
    def _record_tool_call(
        run: ApiRun, name: str, arguments: Any, started: float, duration_s: float, error: str | None
    ) -> None:
        if run.on_tool_call is not None:
            run.on_tool_call(name, arguments, started, duration_s, error)

    async def _put_variable(self, request: web.Request) -> web.Response:
        run: ApiRun = _run_of(request)
        name = request.match_info["name"]
        value = await self._body(request)
        refused = variable_too_deep(name, value)
        if refused:
            return error_response(400, refused)
        run.variables[name] = value
        if run.on_variable is not None:
            run.on_variable(name, value)
        return json_response({"ok": True})
