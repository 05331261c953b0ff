"""aiohttp's typed request key for the runtime service, made at import (imported lazily).

aiohttp's ``RequestKey`` names itself after the module whose top level creates it, found by
walking up the stack to a module frame; made inside a function on the executor's thread there is
none. Importing this module gives it one, and keeps aiohttp out of ``import cronium_nb``.
"""

from __future__ import annotations

from aiohttp import web

from cronium_nb.runtime_api import ApiRun

RUN_KEY: web.RequestKey[ApiRun] = web.RequestKey("run", ApiRun)  # the authenticated request's ApiRun
