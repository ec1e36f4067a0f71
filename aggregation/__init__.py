"""Per-shard aggregation of member updates and the server optimisers that apply them."""
