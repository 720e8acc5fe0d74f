"""Reasoning withholding: the client never sees the upstream's hidden reasoning.

`Withholder` is the one state machine every route goes through: it reads generated text in
pieces of any size (a whole response, SSE deltas, one token) and emits only what lies outside
open/close marker pairs. A piece that might be the start of a marker is held back until the
next piece decides it, so a marker split across chunks is still caught; text left inside an
unclosed block when the output ends (cut by max_tokens or a stop sequence) is dropped.

Log-probs are released per token only when every character of the token was decided visible
(`Withholder.mask`); a token straddling a marker is dropped. Entries whose text does not line
up with the generated text (token-id spellings, reasoning tokens of a separate field) are
dropped rather than guessed at. Separate reasoning fields (`reasoning_content`...) are removed
wherever they appear. Tool-call arguments pass through a withholder of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ReasoningConfig


class Withholder:
    def __init__(self, markers: list[tuple[str, str]], hidden: bool = False):
        self.opens = {o: c for o, c in markers}
        self.all_closes = sorted({c for _, c in markers})
        # close markers that end the current hidden block; None while visible
        self.closes: list[str] | None = list(self.all_closes) if hidden else None
        self.buf = ""  # undecided tail: could still be the start of a marker
        self.mask = bytearray()  # per decided input character: 1 visible, 0 hidden
        self.hidden_chars = 0
        self.visible_chars = 0

    @property
    def hidden(self) -> bool:
        return self.closes is not None

    @property
    def decided(self) -> int:
        return len(self.mask)

    def _show(self, n: int) -> None:
        self.mask.extend(b"\x01" * n)
        self.visible_chars += n

    def _hide(self, n: int) -> None:
        self.mask.extend(b"\x00" * n)
        self.hidden_chars += n

    def feed(self, text: str) -> str:
        """Take the next piece of generated text; return what is now known to be visible."""
        self.buf += text
        out = []
        while self.buf:
            # while visible: look for an open marker, and hide stray close markers too
            targets = list(self.opens) + self.all_closes if self.closes is None else self.closes
            at, hit = _earliest(self.buf, targets)
            if hit is not None:
                if self.closes is None:
                    out.append(self.buf[:at])
                    self._show(at)
                    self._hide(len(hit))
                    if hit in self.opens:
                        self.closes = [self.opens[hit]]
                else:
                    self._hide(at + len(hit))
                    self.closes = None
                self.buf = self.buf[at + len(hit):]
                continue
            keep = _partial_suffix(self.buf, targets)
            settled = len(self.buf) - keep
            if self.closes is None:
                out.append(self.buf[:settled])
                self._show(settled)
            else:
                self._hide(settled)
            self.buf = self.buf[settled:]
            break
        return "".join(out)

    def finish(self) -> str:
        """The output ended: a held-back partial marker was plain text, unless inside reasoning."""
        tail, self.buf = self.buf, ""
        if self.closes is None:
            self._show(len(tail))
            return tail
        self._hide(len(tail))
        return ""

    def open_now(self) -> str:
        """Enter a hidden block here (a template that opens reasoning itself); returns held text."""
        out = self.finish() if self.closes is None else ""
        self.closes = list(self.all_closes)
        return out

    def span_visible(self, start: int, end: int) -> bool:
        """Whether input characters [start, end) were all decided visible (end <= decided)."""
        if end > start:
            return all(self.mask[start:end])
        # an empty token (a special token decoding to ""): visible if its neighbours are
        before = self.mask[start - 1] if start > 0 else (0 if self.hidden else 1)
        after = self.mask[start] if start < len(self.mask) else (0 if self.hidden else 1)
        return bool(before and after)


def _earliest(text: str, targets: list[str]) -> tuple[int, str | None]:
    best, hit = len(text) + 1, None
    for t in targets:
        i = text.find(t)
        if i != -1 and (i < best or (i == best and len(t) > len(hit))):
            best, hit = i, t
    return best, hit


def _partial_suffix(text: str, targets: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some target."""
    longest = 0
    for t in targets:
        for k in range(min(len(t) - 1, len(text)), longest, -1):
            if text.endswith(t[:k]):
                longest = k
                break
    return longest


def strip_fields(obj: Any, names: frozenset[str]) -> int:
    """Remove every key in `names` from nested dicts/lists; return the characters removed."""
    removed = 0
    if isinstance(obj, dict):
        for name in names & obj.keys():
            removed += len(str(obj.pop(name) or ""))
        for v in obj.values():
            removed += strip_fields(v, names)
    elif isinstance(obj, list):
        for v in obj:
            removed += strip_fields(v, names)
    return removed


def withhold_text(text: str, markers: list[tuple[str, str]], hidden: bool = False) -> tuple[str, Withholder]:
    w = Withholder(markers, hidden=hidden or starts_inside(text, markers))
    out = w.feed(text) + w.finish()
    return out, w


def starts_inside(text: str, markers: list[tuple[str, str]]) -> bool:
    """A close marker before any open marker: the text began inside a reasoning block."""
    at_open, _ = _earliest(text, [o for o, _ in markers])
    at_close, _ = _earliest(text, [c for _, c in markers])
    return at_close < at_open


def prompt_leaves_open(tail: str | None, markers: list[tuple[str, str]]) -> bool:
    """Whether the text right before generation ends inside an unclosed reasoning block."""
    if not tail:
        return False
    w = Withholder(markers)
    w.feed(tail)
    return w.hidden


# --- one choice: text pieces plus aligned log-prob entries ---------------------------------


@dataclass
class ChoiceFilter:
    """Withholding for one choice of one response, streamed or whole.

    `echo_prefix`: with echo, the first characters of the output are the client's prompt: they
    pass through the withholder too (so an unclosed marker in them hides what follows), and
    with `implicit_open` the hidden block opens where they end.
    """

    w: Withholder
    echo_prefix: int = 0
    implicit_open: bool = False
    fed: int = 0  # raw characters fed so far
    pending: list = field(default_factory=list)  # (start, end, entry) waiting for their span to be decided
    dropped_entries: int = 0
    done: bool = False
    base_offset: int | None = None  # streamed completions: the upstream's text_offset of raw position 0

    def feed(self, text: str, entries: list | None, token_text) -> tuple[str, list]:
        """Feed raw text and its log-prob entries (None: none); return visible text, released entries."""
        if entries is not None:
            if "".join(token_text(e) for e in entries) == text:
                pos = self.fed
                for e in entries:
                    n = len(token_text(e))
                    self.pending.append((pos, pos + n, e))
                    pos += n
            else:
                self.dropped_entries += len(entries)  # not aligned with the text: never guessed at
        out = []
        if self.implicit_open and self.echo_prefix and self.fed < self.echo_prefix <= self.fed + len(text):
            cut = self.echo_prefix - self.fed
            out.append(self.w.feed(text[:cut]))
            out.append(self.w.open_now())
            text, self.fed = text[cut:], self.fed + cut
        out.append(self.w.feed(text))
        self.fed += len(text)
        return "".join(out), self._release()

    def finish(self) -> tuple[str, list]:
        tail = self.w.finish()
        self.done = True
        return tail, self._release()

    def _release(self) -> list:
        out, i = [], 0
        decided = self.w.decided
        for start, end, e in self.pending:
            # a token is decided once its last character is (an empty one: once the next is)
            if end > decided or (end == start and start >= decided and not self.done):
                break
            if self.w.span_visible(start, end):
                out.append((start, e))
            else:
                self.dropped_entries += 1
            i += 1
        del self.pending[:i]
        return out

    def visible_before(self, pos: int) -> int:
        """Visible characters before raw position `pos` (a completions text_offset)."""
        return self.w.mask.count(1, 0, pos)

    def look_ahead(self, text: str) -> None:
        """Whole responses only: a close marker before any open one means the completion began
        inside a reasoning block (a template that opens it, not configured as implicit_open)."""
        if not self.w.hidden and starts_inside(text[self.echo_prefix:], list(self.w.opens.items())):
            if self.echo_prefix:
                self.implicit_open = True
            else:
                self.w.closes = list(self.w.all_closes)


def new_choice_filter(cfg: ReasoningConfig, prompt_tail: str | None, echo: bool, echo_text: str | None) -> ChoiceFilter:
    """The filter for one choice: starts hidden when the template or the prompt opened a block."""
    if echo and echo_text:
        return ChoiceFilter(Withholder(cfg.markers), echo_prefix=len(echo_text), implicit_open=cfg.implicit_open)
    if echo:  # echoed prompt of unknown length: with implicit_open, hide from the start
        return ChoiceFilter(Withholder(cfg.markers, hidden=cfg.implicit_open))
    hidden = cfg.implicit_open or prompt_leaves_open(prompt_tail, cfg.markers)
    return ChoiceFilter(Withholder(cfg.markers, hidden=hidden))


def summary_text(hidden_tokens: int) -> str:
    return f"[reasoning withheld: ~{hidden_tokens} tokens]"
