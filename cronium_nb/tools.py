"""Tool actions: Python callables in the notebook that scripts call in API mode.

Cronium's API mode lets a script call *tool actions* of the platform; here the platform is the
notebook process::

    def notify(msg: str, channel: str = "ops") -> dict:
        ...
        return {"sent": True}

    ex.tools.register("notify", notify, timeout=10)

and on the server, ``cronium.tool notify '{"msg": "done"}'`` (``cronium.tool("notify", {...})``
in Python and Node) prints ``{"sent":true}``. The arguments are a JSON object, passed to the
callable as keyword arguments; the result must be JSON-able. A coroutine function is awaited on
the executor's loop; a plain function runs in a worker thread, so a slow one never stalls the
other servers' streams. A call that outlives its tool's timeout is answered with an error (a
plain function's thread cannot be stopped and finishes on its own; its result is dropped).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cronium_nb.errors import CroniumError

DEFAULT_TOOL_TIMEOUT_S = 30.0
TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class ToolError(CroniumError):
    """A tool call that did not produce a result; ``kind`` is ``unknown``, ``bad_arguments``,
    ``failed`` or ``timeout``, and the message is what the script is shown."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Tool:
    name: str
    function: Callable[..., Any]
    timeout: float


class ToolRegistry:
    """The tool actions of one executor (``Executor.tools``)."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(
        self, name: str, function: Callable[..., Any] | None = None, *, timeout: float = DEFAULT_TOOL_TIMEOUT_S
    ) -> Any:
        """Register ``function`` as the tool ``name`` (replacing one of that name); without
        ``function``, a decorator."""
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ValueError(f"invalid tool name {name!r}: letters, digits, '_', '.', '-', at most 64")
        if not timeout > 0 or timeout == float("inf"):
            raise ValueError(f"tool timeout must be a positive number of seconds, got {timeout!r}")
        if function is None:
            return lambda function: self.register(name, function, timeout=timeout)
        if not callable(function):
            raise TypeError(f"tool {name!r} must be callable, got {type(function).__name__}")
        self._tools[name] = Tool(name, function, float(timeout))
        return function

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __repr__(self) -> str:
        return f"<ToolRegistry {', '.join(self.names) or '(empty)'}>"

    async def call(self, name: str, arguments: Any) -> Any:
        """Run one call; its JSON-able result, or :class:`ToolError`."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self.names) or "none registered"
            raise ToolError("unknown", f"unknown tool '{name}' (known: {known})")
        if not isinstance(arguments, dict):
            raise ToolError("bad_arguments", f"tool '{name}': arguments must be a JSON object")
        if inspect.iscoroutinefunction(tool.function):
            work = tool.function(**arguments)
        else:
            work = asyncio.to_thread(tool.function, **arguments)
        try:
            result = await asyncio.wait_for(work, tool.timeout)
        except asyncio.TimeoutError:
            raise ToolError("timeout", f"tool '{name}' did not answer within {tool.timeout:g} s") from None
        except Exception as error:
            raise ToolError("failed", f"tool '{name}' failed: {type(error).__name__}: {error}") from None
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            raise ToolError("failed", f"tool '{name}' returned a {type(result).__name__}, which is not JSON") from None
        return result
