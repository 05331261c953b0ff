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
    "SSHOptions": "cronium_nb.ssh.options",
    "Dashboard": "cronium_nb.notebook.dashboard",
}

if TYPE_CHECKING:
    from cronium_nb.executor import Callbacks, Executor, Job
    from cronium_nb.fleet import Fleet, FleetError
    from cronium_nb.inventory import Inventory, InventoryError, UnknownServerError
    from cronium_nb.model import Event, EventError, Server, Status
    from cronium_nb.notebook.dashboard import Dashboard
    from cronium_nb.results import ExecutionResult, ServerResult
    from cronium_nb.ssh.options import SSHOptions


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
    "Callbacks",
    "Dashboard",
    "Event",
    "EventError",
    "ExecutionResult",
    "Executor",
    "Fleet",
    "FleetError",
    "Inventory",
    "InventoryError",
    "Job",
    "SSHOptions",
    "Server",
    "ServerResult",
    "Status",
    "UnknownServerError",
    "__version__",
]
