"""Running executions through a Dask cluster: ``Executor(inventory, cluster=client)``.

The executor's public API stays the same; only where each server's work happens changes. The
parts, and the one direction they talk in:

- :mod:`~cronium_nb.cluster.placement` decides which worker runs which server (a server's
  ``site`` -> a worker offering the resource ``site-<site>``), before anything runs;
- :mod:`~cronium_nb.cluster.dispatch` is the client side, on the executor's loop: it submits one
  Dask task per worker, pinned to it, feeds what the workers relay into the execution (so the
  notebook's store, live views and callbacks see it as for a local run), and fails a lost
  worker's servers with ``worker_lost``;
- :mod:`~cronium_nb.cluster.agent` is the worker side: a worker plugin holding a long-lived
  local executor (its own connection pool and runner sessions: a second execution is warm);
- :mod:`~cronium_nb.cluster.relay` is what goes between them (one source of truth);
- :mod:`~cronium_nb.cluster.local` starts a LocalCluster with a worker per site (tests, notebook 07).

Nothing here is imported by the local path: the executor imports the dispatch only when it is
given a cluster (Dask is the ``[dask]`` extra).
"""
