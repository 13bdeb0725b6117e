"""Training: data, loop, checkpoints, distributed (the `resattn train` command)."""
