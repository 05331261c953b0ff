"""cronium_nb: run scripts on fleets of Linux servers over SSH from Jupyter notebooks."""

from cronium_nb.fleet import Fleet, FleetError
from cronium_nb.inventory import Inventory, InventoryError, UnknownServerError
from cronium_nb.model import Server

__version__ = "0.1.0"

__all__ = ["Fleet", "FleetError", "Inventory", "InventoryError", "Server", "UnknownServerError", "__version__"]
