"""Students, losses and the training loop."""
