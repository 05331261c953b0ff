"""cronium_nb: run scripts on fleets of Linux servers over SSH from Jupyter notebooks."""

from cronium_nb.executor import Callbacks, Executor, Job
from cronium_nb.fleet import Fleet, FleetError
from cronium_nb.inventory import Inventory, InventoryError, UnknownServerError
from cronium_nb.model import Event, EventError, Server, Status
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.ssh.options import SSHOptions

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext cronium_nb``: register the magics."""
    from cronium_nb.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from cronium_nb.notebook.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> object:
    if name == "Dashboard":  # the widget layer loads only when asked for
        from cronium_nb.notebook.dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module 'cronium_nb' has no attribute {name!r}")


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
