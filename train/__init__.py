"""Training: DeepSpeed engine, loop, checkpoints, logging, and the entry points (python -m train.X)."""
