"""Text of a growing token sequence: incremental detokenising and stop strings (for streaming).

Decoding the whole sequence after every token is quadratic; decoding only the new token breaks
multi-byte characters and tokenizers whose pieces depend on their left neighbour. The window
approach (as vLLM does it) decodes from a few tokens back and emits only text that is final,
holding back a trailing U+FFFD (an incomplete UTF-8 character).
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = ""
        self._prefix = 0  # token offset the decode window starts at
        self._read = 0  # tokens already turned into text

    def add(self, ids: list[int]) -> str:
        """Feed the full id list so far; return the newly final text (may be "")."""
        decode = lambda a, b: self.tok.decode(ids[a:b], skip_special_tokens=True)  # noqa: E731
        before = decode(self._prefix, self._read)
        now = decode(self._prefix, len(ids))
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop string in `text` (searching from `start`), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def stop_holdback(stops) -> int:
    """Characters a stream must hold back: the longest stop string could still be completing."""
    return max((len(s) for s in stops), default=1) - 1


def tokens_for_text(tokenizer, ids: list[int], n_chars: int) -> int:
    """The fewest leading tokens whose text reaches past `n_chars` characters (all if none)."""
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) > n_chars:
            return k
    return len(ids)
