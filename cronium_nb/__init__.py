"""cronium_nb: run scripts on fleets of Linux servers over SSH from Jupyter notebooks.

The public names below are imported on first use (PEP 562), so ``import cronium_nb`` stays
light: pandas and asyncssh load with the executor, docker with a :class:`Fleet`, aiohttp only
when an API-mode run starts the runtime service, the widget layer with the magics or
``Dashboard``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Callbacks": "cronium_nb.executor",
    "Executor": "cronium_nb.executor",
    "Job": "cronium_nb.executor",
    "Fleet": "cronium_nb.fleet",
    "FleetError": "cronium_nb.fleet",
    "Inventory": "cronium_nb.inventory",
    "InventoryError": "cronium_nb.inventory",
    "UnknownServerError": "cronium_nb.inventory",
    "Event": "cronium_nb.model",
    "EventError": "cronium_nb.model",
    "Server": "cronium_nb.model",
    "Status": "cronium_nb.model",
    "ExecutionResult": "cronium_nb.results",
    "ServerResult": "cronium_nb.results",
    "Plan": "cronium_nb.rollout",
    "RolloutError": "cronium_nb.rollout",
    "SSHOptions": "cronium_nb.ssh.options",
    "Dashboard": "cronium_nb.notebook.dashboard",
    "CroniumError": "cronium_nb.errors",
    "DetachedError": "cronium_nb.detached",
    "ConnectError": "cronium_nb.errors",
    "HostKeyError": "cronium_nb.errors",
    "DeployError": "cronium_nb.errors",
    "RunnerUnavailable": "cronium_nb.errors",
    "SetupStalled": "cronium_nb.errors",
    "ERROR_KINDS": "cronium_nb.errors",
    "ErrorKind": "cronium_nb.errors",
    "ManifestError": "cronium_nb.manifest",
    "ProtocolError": "cronium_nb.protocol",
    "StoreError": "cronium_nb.store",
    "ToolError": "cronium_nb.tools",
}

if TYPE_CHECKING:
    from cronium_nb.detached import DetachedError
    from cronium_nb.errors import (
        ERROR_KINDS,
        ConnectError,
        CroniumError,
        DeployError,
        ErrorKind,
        HostKeyError,
        RunnerUnavailable,
        SetupStalled,
    )
    from cronium_nb.executor import Callbacks, Executor, Job
    from cronium_nb.fleet import Fleet, FleetError
    from cronium_nb.inventory import Inventory, InventoryError, UnknownServerError
    from cronium_nb.manifest import ManifestError
    from cronium_nb.model import Event, EventError, Server, Status
    from cronium_nb.notebook.dashboard import Dashboard
    from cronium_nb.protocol import ProtocolError
    from cronium_nb.results import ExecutionResult, ServerResult
    from cronium_nb.rollout import Plan, RolloutError
    from cronium_nb.ssh.options import SSHOptions
    from cronium_nb.store import StoreError
    from cronium_nb.tools import ToolError


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cronium_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext cronium_nb``: register the magics."""
    from cronium_nb.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from cronium_nb.notebook.magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "ERROR_KINDS",
    "Callbacks",
    "ConnectError",
    "CroniumError",
    "Dashboard",
    "DeployError",
    "DetachedError",
    "ErrorKind",
    "Event",
    "EventError",
    "ExecutionResult",
    "Executor",
    "Fleet",
    "FleetError",
    "HostKeyError",
    "Inventory",
    "InventoryError",
    "Job",
    "ManifestError",
    "Plan",
    "ProtocolError",
    "RolloutError",
    "RunnerUnavailable",
    "SSHOptions",
    "Server",
    "ServerResult",
    "SetupStalled",
    "Status",
    "StoreError",
    "ToolError",
    "UnknownServerError",
    "__version__",
]
