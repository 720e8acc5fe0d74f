"""stillhouse: knowledge distillation for LLMs, from teacher outputs to a smaller student."""

__version__ = "0.1.0"
