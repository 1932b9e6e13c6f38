"""What the orchestrator and the workers share, defined once and torch-free: errors, the layerwise
manifest, the engine protocol and score kinds, the shard layout, the worker messages, the part
format and atomic writes."""
