"""Verdicts and answer extraction shared by every verifier."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S | re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*\**\s*([^\n]*)", re.I)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float
    extracted: str
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(s: str) -> bool:
    return bool(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", s or ""))


def extract_final_answer(text: str, reference: str | None = None) -> str:
    """The model's final answer: an <answer> tag if present, else the last number when the
    reference is numeric, else the text after "answer is", else the last non-empty line."""
    tags = _TAG.findall(text)
    if tags:
        return tags[-1].strip()
    cleaned = text.replace(",", "") if reference is None or "," not in reference else text
    if reference is None or _is_number(reference):
        nums = _NUMBER.findall(cleaned)
        if nums:
            return nums[-1]
    m = _ANSWER_IS.findall(text)
    if m:
        return m[-1].strip().rstrip(".").strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
