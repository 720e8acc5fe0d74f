"""Withholding applied to OpenAI response shapes: chat and completions, whole or streamed.

One `ResponseFilter` per request keeps one `ChoiceFilter` per choice index (n > 1 and batched
prompts stream interleaved) and one `Withholder` per tool call's arguments.
"""

from __future__ import annotations

from typing import Any

from .config import ReasoningConfig
from .withhold import ChoiceFilter, Withholder, new_choice_filter, strip_fields, summary_text, withhold_text


def _chat_token(e: Any) -> str:
    return e.get("token", "") if isinstance(e, dict) else ""


def _comp_token(e: Any) -> str:
    return e[0] if isinstance(e[0], str) else ""


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None


class ResponseFilter:
    def __init__(self, chat: bool, cfg: ReasoningConfig, request: dict):
        self.chat, self.cfg = chat, cfg
        self.fields = frozenset(cfg.fields)
        self.n = request.get("n") or 1
        self.echo = bool(request.get("echo"))
        if chat:
            msgs = request.get("messages") or []
            last = msgs[-1] if msgs and isinstance(msgs[-1], dict) else {}
            self._tails = [_text_of(last.get("content")) if last.get("role") == "assistant" else None]
        else:
            p = request.get("prompt")
            self._tails = [p] if isinstance(p, str) else [x if isinstance(x, str) else None for x in p] if isinstance(p, list) else [None]
        self.choices: dict[int, ChoiceFilter] = {}
        self.tools: dict[tuple[int, int], Withholder] = {}
        self.refusals: dict[int, Withholder] = {}
        self.field_chars = 0  # characters of separate reasoning fields dropped
        self.finished: set[int] = set()
        self._last_chunk: dict | None = None

    # --- bookkeeping ------------------------------------------------------------------

    def choice(self, idx: int) -> ChoiceFilter:
        cf = self.choices.get(idx)
        if cf is None:
            tails = self._tails
            tail = tails[0] if self.chat or len(tails) == 1 else (tails[idx // self.n] if idx // self.n < len(tails) else None)
            cf = self.choices[idx] = new_choice_filter(self.cfg, tail, self.echo, tail)
        return cf

    @property
    def hidden_chars(self) -> int:
        return self.field_chars + sum(cf.w.hidden_chars for cf in self.choices.values()) + sum(w.hidden_chars for w in self.tools.values())

    def withheld_tokens(self, usage: dict | None) -> int:
        """Hidden tokens: the upstream's reasoning_tokens if it reports them, else the hidden
        share of the characters applied to its completion_tokens."""
        usage = usage or {}
        details = usage.get("completion_tokens_details") or {}
        if isinstance(details.get("reasoning_tokens"), int) and details["reasoning_tokens"] > 0:
            return details["reasoning_tokens"]
        hidden = self.hidden_chars
        if not hidden:
            return 0
        visible = sum(cf.w.visible_chars for cf in self.choices.values())
        return round((usage.get("completion_tokens") or 0) * hidden / (hidden + visible)) or 1

    def _summarise(self, target: dict, cf: ChoiceFilter) -> None:
        if self.cfg.summary == "length" and cf.w.hidden_chars:
            target["reasoning_summary"] = summary_text(max(1, cf.w.hidden_chars // 4))

    # --- whole responses ----------------------------------------------------------------

    def whole(self, resp: dict) -> dict:
        self.field_chars += strip_fields(resp, self.fields)
        for i, ch in enumerate(resp.get("choices") or []):
            cf = self.choice(ch.get("index", i))
            if self.chat:
                self._whole_chat(ch, cf)
            else:
                self._whole_completion(ch, cf)
        return resp

    def _whole_chat(self, ch: dict, cf: ChoiceFilter) -> None:
        msg = ch.get("message") or {}
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        content = msg.get("content")
        if isinstance(content, str):
            cf.look_ahead(content)
            entries = _content_suffix(lp.get("content"), content) if lp else None
            text, rel = cf.feed(content, entries, _chat_token)
            tail, rel2 = cf.finish()
            msg["content"] = text + tail
            if lp is not None and entries is not None:
                lp["content"] = [e for _, e in rel + rel2]
        elif lp is not None and lp.get("content"):
            lp["content"] = []  # log-probs without text to line up with: nothing is released
        if isinstance(msg.get("refusal"), str):
            new, w = withhold_text(msg["refusal"], self.cfg.markers)
            if w.hidden_chars and lp is not None and lp.get("refusal"):
                lp["refusal"] = []
            msg["refusal"] = new
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if fn and isinstance(fn.get("arguments"), str):
                fn["arguments"], w = withhold_text(fn["arguments"], self.cfg.markers)
                self.tools[(id(fn), 0)] = w
        fc = msg.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            fc["arguments"], w = withhold_text(fc["arguments"], self.cfg.markers)
            self.tools[(id(fc), 0)] = w
        self._summarise(msg, cf)

    def _whole_completion(self, ch: dict, cf: ChoiceFilter) -> None:
        text = ch.get("text") if isinstance(ch.get("text"), str) else ""
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        cf.look_ahead(text)
        entries = _completion_entries(lp)
        out, rel = cf.feed(text, entries, _comp_token)
        tail, rel2 = cf.finish()
        ch["text"] = out + tail
        if lp is not None:
            _set_completion_logprobs(lp, rel + rel2, cf, _first_offset(lp))
        self._summarise(ch, cf)

    # --- streamed chunks ----------------------------------------------------------------

    def chunk(self, c: dict) -> dict | None:
        """Filter one SSE chunk; None when nothing of it may (or needs to) reach the client."""
        self.field_chars += strip_fields(c, self.fields)
        if not isinstance(c.get("choices"), list):
            return c
        self._last_chunk = c
        kept = []
        for i, ch in enumerate(c["choices"]):
            idx = ch.get("index", i)
            keep = self._chunk_chat(ch, idx) if self.chat else self._chunk_completion(ch, idx)
            if keep:
                kept.append(ch)
        if not kept and c["choices"] and not c.get("usage"):
            return None
        c["choices"] = kept
        return c

    def _chunk_chat(self, ch: dict, idx: int) -> bool:
        cf = self.choice(idx)
        delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        raw = delta.get("content")
        entries = lp.get("content") if lp else None
        text, rel = cf.feed(raw if isinstance(raw, str) else "", entries, _chat_token)
        for tc in delta.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if fn and isinstance(fn.get("arguments"), str):
                w = self.tools.setdefault((idx, tc.get("index", 0)), Withholder(self.cfg.markers))
                fn["arguments"] = w.feed(fn["arguments"])
        if isinstance(delta.get("refusal"), str):
            delta["refusal"] = self.refusals.setdefault(idx, Withholder(self.cfg.markers)).feed(delta["refusal"])
        finish = ch.get("finish_reason") is not None
        if finish:
            text, rel = self._finish_chat(idx, delta, text, rel)
        if isinstance(raw, str) or text:
            delta["content"] = text
        if lp is not None and "content" in lp:
            lp["content"] = [e for _, e in rel]
        if finish:
            self._summarise(delta, cf)
        return bool(text or delta.get("role") or delta.get("tool_calls") or delta.get("function_call")
                    or delta.get("refusal") or finish or (lp and lp.get("content")))

    def _finish_chat(self, idx: int, delta: dict, text: str, rel: list) -> tuple[str, list]:
        self.finished.add(idx)
        tail, rel2 = self.choice(idx).finish()
        for (cidx, tidx), w in self.tools.items():
            if cidx == idx and (rest := w.finish()):
                delta.setdefault("tool_calls", []).append({"index": tidx, "function": {"arguments": rest}})
        if idx in self.refusals and (rest := self.refusals[idx].finish()):
            delta["refusal"] = (delta.get("refusal") or "") + rest
        return text + tail, rel + rel2

    def _chunk_completion(self, ch: dict, idx: int) -> bool:
        cf = self.choice(idx)
        text = ch.get("text") if isinstance(ch.get("text"), str) else ""
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        base = cf.base_offset
        if base is None and lp and lp.get("text_offset"):
            cf.base_offset = base = lp["text_offset"][0] - cf.fed
        out, rel = cf.feed(text, _completion_entries(lp), _comp_token)
        finish = ch.get("finish_reason") is not None
        if finish:
            self.finished.add(idx)
            tail, rel2 = cf.finish()
            out, rel = out + tail, rel + rel2
            self._summarise(ch, cf)
        ch["text"] = out
        if lp is not None:
            _set_completion_logprobs(lp, rel, cf, base or 0)
        return bool(out or finish or (lp and lp.get("tokens")))

    def close(self) -> list[dict]:
        """The stream ended: release what unfinished choices still hold back (plain text only)."""
        out = []
        for idx, cf in self.choices.items():
            if idx in self.finished:
                continue
            tail, _ = cf.finish()
            if tail and self._last_chunk is not None:
                base = {k: v for k, v in self._last_chunk.items() if k in ("id", "object", "created", "model")}
                ch = {"index": idx, "delta": {"content": tail}} if self.chat else {"index": idx, "text": tail}
                out.append({**base, "choices": [{**ch, "finish_reason": None}]})
        return out


def _content_suffix(entries: list | None, content: str) -> list | None:
    """The entries that spell `content` when they are a suffix of all the entries: an upstream
    that moves reasoning to its own field may still give log-probs for every generated token,
    reasoning first. Anything else is returned as is (and dropped by the filter if unaligned)."""
    if not entries or not all(isinstance(e, dict) for e in entries):
        return entries
    total = sum(len(_chat_token(e)) for e in entries)
    skip = total - len(content)
    if skip <= 0:
        return entries
    for k, e in enumerate(entries):
        if skip == 0:
            tail = entries[k:]
            return tail if "".join(_chat_token(t) for t in tail) == content else entries
        skip -= len(_chat_token(e))
        if skip < 0:
            break
    return entries


def _completion_entries(lp: dict | None) -> list | None:
    if not lp or not isinstance(lp.get("tokens"), list):
        return None
    toks = lp["tokens"]
    n = len(toks)
    lps = lp.get("token_logprobs") or [None] * n
    tops = lp.get("top_logprobs") or [None] * n
    if len(lps) != n or len(tops) != n:
        return []  # malformed: nothing is released
    return list(zip(toks, lps, tops))


def _first_offset(lp: dict) -> int:
    offs = lp.get("text_offset")
    return offs[0] if offs else 0


def _set_completion_logprobs(lp: dict, released: list, cf: ChoiceFilter, base: int) -> None:
    had_tops = lp.get("top_logprobs") is not None
    lp["tokens"] = [e[0] for _, e in released]
    lp["token_logprobs"] = [e[1] for _, e in released]
    lp["top_logprobs"] = [e[2] for _, e in released] if had_tops else None
    lp["text_offset"] = [base + cf.visible_before(start) for start, _ in released]
