"""Pre-training: optimizers, learning-rate schedules, losses (and, later, the trainer)."""
