"""Evaluation: held-out accuracy, speed, size and closeness to the teacher."""
