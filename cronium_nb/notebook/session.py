"""What the magics share within one kernel: the inventory, the fleet, the executor."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

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
        self._ssh_options: SSHOptions | None = None  # None: the defaults
        self.confirm_above: int | None = None  # %cronium_confirm_above; None: the executor's default
        self._cluster: Any = None  # a distributed.Client (%cronium_cluster), or None: run locally

    @property
    def inventory(self) -> Inventory:
        return self.loaded.merged(self.fleet.inventory) if self.fleet else self.loaded

    @property
    def ssh_options(self) -> SSHOptions:
        """The executor's SSH options (the defaults, or those chosen, before it exists)."""
        if self._executor is not None:
            return self._executor.ssh_options
        return self._ssh_options or SSHOptions()

    def use_ssh_config(self, path: str | os.PathLike[str]) -> None:
        """Resolve and connect with the OpenSSH client config ``path`` from now on. An executor
        made with another one is closed (what it runs in the background is cancelled); the next
        run makes a new one, with the same state dir."""
        config = Path(os.path.expanduser(os.fspath(path))).absolute()
        if not config.is_file():
            raise ValueError(f"ssh config {config} is not a file")
        if self.ssh_options.ssh_config is not None and Path(self.ssh_options.ssh_config) == config:
            return
        self._ssh_options = replace(self.ssh_options, ssh_config=config)
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def use_cluster(self, client: Any) -> None:
        """Run through the Dask cluster of ``client`` from now on (None: in this process again).
        The current executor is closed (what it runs in the background is cancelled); the next
        run makes a new one, with the same state dir."""
        if client is self._cluster:
            return
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self._cluster = client

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = Executor(self.inventory, ssh_options=self._ssh_options, cluster=self._cluster)
        self._executor.inventory = self.inventory
        if self.confirm_above is not None:
            self._executor.confirm_above = self.confirm_above
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        if self.fleet is not None:
            self.fleet.down()
            self.fleet = None
