"""Verifiers that compare a completion with a reference answer: exact, numeric, ROUGE-L, math.

Each is `Verifier(record, completion) -> Verdict` and reads the reference from
`record["answer"]`, so a user's JSONL of prompts and answers can name any of them.
"""

from __future__ import annotations

import math
import re

from ..errors import StillhouseError
from .base import Verdict, extract_final_answer

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold().rstrip(".")


class ExactMatch:
    """The extracted final answer equals the reference, ignoring case, spacing and a final period."""

    def __call__(self, record: dict, completion: str) -> Verdict:
        ref = str(record["answer"])
        got = extract_final_answer(completion, ref)
        ok = _norm(got) == _norm(ref)
        return Verdict(ok, float(ok), got)


class NumericMatch:
    """The last number in the completion equals the numeric reference (relative tolerance)."""

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        self.rel_tol, self.abs_tol = rel_tol, abs_tol

    def __call__(self, record: dict, completion: str) -> Verdict:
        ref_text = str(record["answer"]).replace(",", "")
        ref_nums = _NUMBER.findall(ref_text)
        if not ref_nums:
            return Verdict(False, 0.0, "", f"reference is not a number: {record['answer']!r}")
        got_nums = _NUMBER.findall(extract_final_answer(completion, ref_nums[-1]).replace(",", ""))
        if not got_nums:
            return Verdict(False, 0.0, "", "no number in the completion")
        got, ref = float(got_nums[-1]), float(ref_nums[-1])
        ok = math.isclose(got, ref, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return Verdict(ok, float(ok), got_nums[-1])


class RougeL:
    """ROUGE-L F1 of the whole completion against the reference; passes at `threshold`."""

    def __init__(self, threshold: float = 0.5):
        from rouge_score import rouge_scorer

        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def __call__(self, record: dict, completion: str) -> Verdict:
        f1 = self._scorer.score(str(record["answer"]), completion)["rougeL"].fmeasure
        return Verdict(f1 >= self.threshold, float(f1), completion.strip())


def _math():
    from .math import MathVerifier  # the shared math-verify wrapper

    return MathVerifier()


REFERENCE_VERIFIERS = {"exact": ExactMatch, "numeric": NumericMatch, "rouge_l": RougeL, "math": _math}


def reference_verifier(name: str):
    if name not in REFERENCE_VERIFIERS:
        raise StillhouseError(f"unknown verifier '{name}' (known: {', '.join(REFERENCE_VERIFIERS)})")
    return REFERENCE_VERIFIERS[name]()
