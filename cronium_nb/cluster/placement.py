"""Which Dask worker runs which server, decided before anything runs.

A server with a ``site`` runs on a worker that offers the resource ``site-<site>`` (a worker
started with ``--resources site-eu=1``, or ``LocalCluster(resources=...)``); a server without
one runs on any worker. Within its choices each server goes to the worker with the fewest
servers so far, so a site's servers spread over its workers. The resource only marks where a
worker can reach; the tasks do not consume it, so a worker runs several executions at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from cronium_nb.errors import CroniumError
from cronium_nb.model import Server

SITE_RESOURCE_PREFIX = "site-"


class PlacementError(CroniumError, ValueError):
    """The servers cannot be placed on the cluster's workers (no workers, or a site no worker
    offers); raised before anything runs."""


def site_resource(site: str) -> str:
    return f"{SITE_RESOURCE_PREFIX}{site}"


def place(servers: Iterable[Server], workers: Mapping[str, Mapping[str, float]]) -> dict[str, list[Server]]:
    """``{worker address: its servers}`` for ``workers`` given as ``{address: resources}``."""
    servers = list(servers)
    if not workers:
        raise PlacementError("the Dask cluster has no workers: start some (or wait for them) before running")
    everyone = sorted(workers)
    by_site: dict[str, list[str]] = {}
    for site in sorted({s.site for s in servers if s.site is not None}):
        offering = [address for address in everyone if workers[address].get(site_resource(site), 0) > 0]
        if not offering:
            names = ", ".join(s.name for s in servers if s.site == site)
            offered = sorted({r for resources in workers.values() for r in resources if r.startswith("site-")})
            raise PlacementError(
                f"no Dask worker offers site {site!r} (worker resource {site_resource(site)}) for server(s) "
                f"{names}; the workers offer: {', '.join(offered) or 'no site at all'}"
            )
        by_site[site] = offering
    load: Counter[str] = Counter()
    plan: dict[str, list[Server]] = {}
    # Sited servers first: they have fewer choices; the others then fill the least loaded workers.
    for server in sorted(servers, key=lambda s: s.site is None):
        choices = by_site[server.site] if server.site is not None else everyone
        address = min(choices, key=lambda a: (load[a], a))
        load[address] += 1
        plan.setdefault(address, []).append(server)
    return plan
