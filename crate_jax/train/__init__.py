"""Training: optimizers, schedules and the training loop."""
