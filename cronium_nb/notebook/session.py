"""What the magics share within one kernel: the inventory, the fleet, the executor."""

from __future__ import annotations

from cronium_nb.executor import Executor
from cronium_nb.fleet import Fleet
from cronium_nb.inventory import Inventory
from cronium_nb.ssh.options import SSHOptions


class NotebookSession:
    """The servers loaded with ``%cronium_servers``, a fleet from ``%cronium_fleet`` and one
    executor for both (created on first use; its inventory follows the other two)."""

    def __init__(self) -> None:
        self.loaded = Inventory()
        self.fleet: Fleet | None = None
        self._executor: Executor | None = None

    @property
    def inventory(self) -> Inventory:
        return self.loaded.merged(self.fleet.inventory) if self.fleet else self.loaded

    @property
    def ssh_options(self) -> SSHOptions:
        """The executor's SSH options (the defaults before it exists)."""
        return self._executor.ssh_options if self._executor is not None else SSHOptions()

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = Executor(self.inventory)
        self._executor.inventory = self.inventory
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        if self.fleet is not None:
            self.fleet.down()
            self.fleet = None
