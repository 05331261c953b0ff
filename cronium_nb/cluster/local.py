"""A Dask cluster on this machine with one worker process per site, for trying placement out
(tests, benchmarks, the example notebook): everything bound to 127.0.0.1."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

from cronium_nb.cluster.placement import site_resource


def local_cluster(sites: Iterable[str | None], *, threads_per_worker: int = 4, **options: Any) -> Any:
    """A ``distributed.LocalCluster`` (worker processes, scheduler, dashboard all on 127.0.0.1)
    with one worker per entry of ``sites``: a worker for site ``"eu"`` offers the resource
    ``site-eu``; ``None`` offers no site. ``threads_per_worker`` bounds how many executions a
    worker runs at once. ``options`` go to ``LocalCluster``."""
    from distributed import LocalCluster

    options = {
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "silence_logs": logging.WARNING,
        **options,
    }
    cluster = LocalCluster(n_workers=0, threads_per_worker=threads_per_worker, **options)
    sites = list(sites)
    for index, site in enumerate(sites):
        spec = copy.deepcopy(cluster.new_spec)
        spec["options"]["resources"] = {} if site is None else {site_resource(site): 1}
        cluster.worker_spec[f"{site or 'any'}-{index}"] = spec
    cluster.scale(len(sites))
    return cluster
