"""Training: the loop, its wiring, tasks, losses, metrics, callbacks, schedules, optimisers, checkpoints."""
