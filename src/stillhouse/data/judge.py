"""Teacher-as-judge: the judge prompt and a score parser that survives malformed answers.

Judges ramble, restate the scale ("on a scale of 1 to 10"), use markdown, fractions or
brackets, and sometimes give no score at all. The parser accepts only an explicit score
inside the scale and returns None for anything else; the caller counts and skips those.
"""

from __future__ import annotations

import math
import re

# A plain number: no sign (a negative score is malformed), no exponent, not part of a longer number.
_NUM = r"(?<![-\u2212+0-9.])([0-9]{1,3}(?:\.[0-9]+)?)(?![0-9]|\.[0-9]|[eE][-+0-9])"
# "Score: 7", "**Score**: 7/10", "Rating = 8.5", "Final score - 9", "[[6]]"; not "score 1 to 10"
_EXPLICIT = re.compile(
    rf"(?:score|rating|grade)[^\w\n]{{0,6}}(?:is[^\w\n]{{1,3}}|of[^\w\n]{{1,3}})?{_NUM}(?!\s*(?:to|-)\s*[0-9])"
    rf"|\[\[\s*{_NUM}\s*\]\]",
    re.I,
)
# "7/10" or "7 out of 10" (the scale's own maximum after it)
_FRACTION = re.compile(rf"{_NUM}\s*(?:/|out of)\s*([0-9]{{1,3}})(?![0-9])", re.I)


def parse_score(text: object, low: float = 1, high: float = 10) -> float | None:
    """The judge's score in [low, high], or None when there is no unambiguous explicit one.

    The last explicit "score: N" (or [[N]]) wins; otherwise the last "N/high" fraction.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = text[-4000:]  # the verdict is at the end; bounded work on a runaway answer
    candidates = [m.group(1) or m.group(2) for m in _EXPLICIT.finditer(text)]
    if not candidates:
        candidates = [m.group(1) for m in _FRACTION.finditer(text) if float(m.group(2)) == high]
    if not candidates:
        return None
    value = float(candidates[-1])
    if not math.isfinite(value) or not low <= value <= high:
        return None
    return value
