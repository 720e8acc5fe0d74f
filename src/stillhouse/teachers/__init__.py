"""Generation backends behind one small interface (see base.py)."""

from .base import Completion, SamplingParams, Teacher

__all__ = ["Completion", "SamplingParams", "Teacher"]
