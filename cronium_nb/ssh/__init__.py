"""SSH transport: connection pool, host keys, runner deployment, one remote run."""
