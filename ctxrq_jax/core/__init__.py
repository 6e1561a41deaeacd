"""Core: config checks, mesh and sharding, checkpoints, host set-up, the one train loop, progress and CLI behaviour."""
