"""Maths answers checked for equivalence with math-verify (LaTeX, fractions, boxed answers)."""

from __future__ import annotations

import threading

from stillhouse.verify.base import Verdict


def _as_latex(answer: str) -> str:
    """math-verify reads LaTeX between delimiters; a bare reference like x^2+2x needs them."""
    a = answer.strip()
    return a if ("$" in a or "\\boxed" in a or "\\(" in a) else f"${a}$"


class MathVerifier:
    """Passes when the completion's final answer equals `record["answer"]` mathematically."""

    def __init__(self, field: str = "answer"):
        self.field = field

    def __call__(self, record: dict, completion: str) -> Verdict:
        from math_verify import parse, verify

        # math-verify's timeouts use SIGALRM, which exists only on the main thread.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(_as_latex(str(record[self.field])), parsing_timeout=timeout)
        pred = parse(completion, parsing_timeout=timeout)
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout)
        extracted = str(pred[-1]) if pred else ""
        return Verdict(ok, 1.0 if ok else 0.0, extracted, "" if pred else "no answer found")
