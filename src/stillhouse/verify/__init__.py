"""Verifiers: `verifier(record, completion_text) -> Verdict`. Shared by the data engine and evaluation."""

from .base import Verdict, extract_final_answer

__all__ = ["Verdict", "extract_final_answer"]
