"""The shared model: MoE transformer policy, LoRA adapters, shard layout and shard store."""
