"""Training infrastructure: Anakin loop, sharding, checkpoints, metrics, videos, the run driver."""
