"""kyodo member node: robot data, DP training of assigned shards, and the member CLI."""
