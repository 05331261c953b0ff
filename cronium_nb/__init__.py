"""cronium_nb: run scripts on fleets of Linux servers over SSH from Jupyter notebooks."""

from cronium_nb.executor import Callbacks, Executor, Job
from cronium_nb.fleet import Fleet, FleetError
from cronium_nb.inventory import Inventory, InventoryError, UnknownServerError
from cronium_nb.model import Event, EventError, Server, Status
from cronium_nb.results import ExecutionResult, ServerResult
from cronium_nb.ssh.options import SSHOptions

__version__ = "0.1.0"

__all__ = [
    "Callbacks",
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
