"""pytest plugin: the Docker sshd fleet as session fixtures.

Installed as the ``cronium`` pytest plugin (entry point ``pytest11``), so a project that has
cronium_nb installed can write::

    def test_my_script(cronium_fleet):
        inventory = cronium_fleet.inventory          # amd64-1, arm64-1, groups amd64/arm64/fleet
        result = cronium_fleet.exec("amd64-1", "uname -m")

Fixtures:

``cronium_fleet``
    full images (bash, python3, node), ``--cronium-amd64`` / ``--cronium-arm64`` servers (1 + 1).
``cronium_bare_fleet``
    bare images (no python3, no node), one server of each architecture.
``cronium_fleet_factory``
    ``factory(amd64=, arm64=, variant=, **Fleet.up options)``; fleets with the same arguments are
    shared within the session and all are removed at its end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cronium_nb.fleet import Fleet


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cronium", "cronium_nb Docker sshd fleet")
    group.addoption("--cronium-amd64", type=int, default=1, help="amd64 servers in cronium_fleet (default 1)")
    group.addoption("--cronium-arm64", type=int, default=1, help="arm64 servers in cronium_fleet (default 1)")


class FleetFactory:
    """Starts fleets on demand, shares identical ones, and removes them all on :meth:`close`."""

    def __init__(self) -> None:
        self._fleets: dict[tuple, Fleet] = {}

    def __call__(self, amd64: int = 1, arm64: int = 1, variant: str = "full", **options: Any) -> Fleet:
        key = (amd64, arm64, variant, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._fleets:
            self._fleets[key] = Fleet.up(amd64=amd64, arm64=arm64, variant=variant, **options)
        return self._fleets[key]

    def close(self) -> None:
        while self._fleets:
            _, fleet = self._fleets.popitem()
            fleet.down()


@pytest.fixture(scope="session")
def cronium_fleet_factory() -> Iterator[FleetFactory]:
    Fleet.cleanup_stale()
    factory = FleetFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def cronium_fleet(cronium_fleet_factory: FleetFactory, pytestconfig: pytest.Config) -> Fleet:
    return cronium_fleet_factory(
        amd64=pytestconfig.getoption("--cronium-amd64"), arm64=pytestconfig.getoption("--cronium-arm64")
    )


@pytest.fixture(scope="session")
def cronium_bare_fleet(cronium_fleet_factory: FleetFactory) -> Fleet:
    return cronium_fleet_factory(amd64=1, arm64=1, variant="bare", name_prefix="bare-")
