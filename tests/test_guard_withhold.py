"""Reasoning withholding: the state machine, then a battery of attack requests through the real
gateway against a stub upstream whose reasoning carries a canary (guard_support.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from guard_support import ANSWER, CANARY, HIDDEN, gateway_server, guard_config, hidden_in, make_keys, post, sse_events, upstream_server
from stillhouse.guard.withhold import Withholder, withhold_text

M = [("<think>", "</think>")]


def _chunked(text: str, cuts: list[int], hidden: bool = False) -> str:
    w = Withholder(M, hidden=hidden)
    out, pos = [], 0
    for c in sorted(set(cuts)):
        out.append(w.feed(text[pos:c]))
        pos = c
    out.append(w.feed(text[pos:]))
    return "".join(out) + w.finish()


def test_withholder_basics():
    assert withhold_text("<think>secret</think>Answer", M)[0] == "Answer"
    assert withhold_text("A<think>s1</think>B<think>s2</think>C", M)[0] == "ABC"
    assert withhold_text("Answer <thi", M)[0] == "Answer <thi"  # a partial marker at the end is text
    assert withhold_text("<think>cut by max_tokens", M)[0] == ""  # no closing tag: all hidden
    assert withhold_text("secret</think>Answer", M)[0] == "Answer"  # began inside (R1 template)
    assert withhold_text("a < b and c > d", M)[0] == "a < b and c > d"
    assert _chunked("<think>secret</think>Answer", [3, 4, 12, 17, 20]) == "Answer"
    assert _chunked("secret</think>Answer", [2, 9], hidden=True) == "Answer"


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["<think>", "</think>", "ЖЯ", "ab", "<", "th", "ink>", "/", " "]), max_size=14),
    cuts=st.lists(st.integers(0, 80), max_size=8),
)
def test_any_chunking_gives_the_whole_text_result(parts, cuts):
    text = "".join(parts)
    w = Withholder(M)
    whole = w.feed(text) + w.finish()
    assert _chunked(text, cuts) == whole
    # what is shown is exactly the characters outside blocks (mask agrees with the output)
    assert whole == "".join(ch for ch, vis in zip(text, w.mask) if vis)


# --- the battery -----------------------------------------------------------------------------

CHAT, COMP = "/chat/completions", "/completions"
U = [{"role": "user", "content": "What is six times seven?"}]

# (name, path, body): each request tries one route by which hidden reasoning could leave
ATTACKS = [
    ("chat plain", CHAT, {"model": "inline", "messages": U}),
    ("chat stream, markers split across chunks", CHAT, {"model": "inline", "messages": U, "stream": True}),
    ("chat logprobs + top_logprobs", CHAT, {"model": "inline", "messages": U, "logprobs": True, "top_logprobs": 5}),
    ("chat stream logprobs", CHAT, {"model": "inline", "messages": U, "stream": True, "logprobs": True, "top_logprobs": 3}),
    ("chat max_tokens cuts inside reasoning", CHAT, {"model": "inline", "messages": U, "max_tokens": 6, "logprobs": True}),
    ("chat stream max_tokens cuts inside reasoning", CHAT, {"model": "inline", "messages": U, "max_tokens": 6, "stream": True, "logprobs": True}),
    ("chat stop inside reasoning", CHAT, {"model": "inline", "messages": U, "stop": ["ЮЖЯ"]}),
    ("chat stream stop = close marker", CHAT, {"model": "inline", "messages": U, "stop": "</think>", "stream": True}),
    ("chat n=3", CHAT, {"model": "inline", "messages": U, "n": 3, "logprobs": True, "top_logprobs": 2}),
    ("chat stream n=3", CHAT, {"model": "inline", "messages": U, "n": 3, "stream": True, "logprobs": True}),
    ("chat reasoning_content field", CHAT, {"model": "field", "messages": U, "logprobs": True, "top_logprobs": 2}),
    ("chat stream reasoning_content field", CHAT, {"model": "field", "messages": U, "stream": True, "logprobs": True}),
    ("chat tool-call arguments", CHAT, {"model": "tool", "messages": U, "tools": [{"type": "function", "function": {"name": "weather"}}]}),
    ("chat stream tool-call arguments", CHAT, {"model": "tool", "messages": U, "stream": True, "tools": [{"type": "function", "function": {"name": "weather"}}]}),
    ("chat two reasoning blocks", CHAT, {"model": "multi", "messages": U, "logprobs": True}),
    ("chat stream two reasoning blocks", CHAT, {"model": "multi", "messages": U, "stream": True, "logprobs": True, "top_logprobs": 1}),
    ("chat R1 template (close marker only)", CHAT, {"model": "r1", "messages": U, "logprobs": True}),
    ("chat assistant prefill ends with <think>", CHAT, {"model": "inline", "messages": U + [{"role": "assistant", "content": "Sure. <think>"}]}),
    ("chat stream prefill ends with <think>", CHAT, {"model": "inline", "messages": U + [{"role": "assistant", "content": "<think>"}], "stream": True, "logprobs": True}),
    ("chat echo of a prefill ending with <think>", CHAT, {"model": "inline", "messages": U + [{"role": "assistant", "content": "<think>"}], "echo": True, "logprobs": True}),
    ("completions plain", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA:"}),
    ("completions logprobs=5", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA:", "logprobs": 5}),
    ("completions stream logprobs", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA:", "stream": True, "logprobs": 3}),
    ("completions echo + logprobs", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA:", "echo": True, "logprobs": 2}),
    ("completions prompt ends with <think>", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA: <think>", "logprobs": 1}),
    ("completions stream prompt ends with <think>", COMP, {"model": "inline", "prompt": "Q: 6*7?\nA: <think>", "stream": True, "logprobs": 1}),
    ("completions echo + prompt ends with <think>", COMP, {"model": "inline", "prompt": "A: <think>", "echo": True, "logprobs": 1}),
    ("completions stream echo + prompt ends with <think>", COMP, {"model": "inline", "prompt": "A: <think>", "echo": True, "stream": True, "logprobs": 1}),
    ("completions batch of prompts, n=2, stream", COMP, {"model": "inline", "prompt": ["one", "two <think>"], "n": 2, "stream": True, "logprobs": 1}),
    ("completions max_tokens cut, stream", COMP, {"model": "inline", "prompt": "x", "max_tokens": 4, "stream": True, "logprobs": 2}),
    ("completions stop inside reasoning", COMP, {"model": "inline", "prompt": "x", "stop": ["ЯЖЮ"], "logprobs": 2}),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard-withhold")
    [key] = make_keys(tmp / "keys.json", {})
    with upstream_server() as (up_app, up_url), gateway_server(guard_config(tmp), up_url) as (_, url):
        up_app.state.url = up_url
        yield up_app, url, key


def _parsed(r, stream: bool):
    return sse_events(r.text) if stream else r.json()


@pytest.mark.parametrize("name,path,body", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_leaks_nothing(rig, name, path, body):
    up_app, url, key = rig
    before = len(up_app.state.raw)
    r = post(url, path, key, body)
    assert r.status_code == 200, r.text
    # the attack did reach hidden reasoning upstream: the canary was generated for this request
    assert any(CANARY in raw for raw in up_app.state.raw[before:])
    assert not any(c in r.text for c in HIDDEN) and "\\u04" not in r.text  # raw bytes, escaped or not
    assert not hidden_in(_parsed(r, body.get("stream", False)))


def test_battery_is_large_enough_and_answers_survive(rig):
    assert len(ATTACKS) >= 20
    up_app, url, key = rig
    r = post(url, CHAT, key, {"model": "inline", "messages": U, "logprobs": True, "top_logprobs": 2})
    msg = r.json()["choices"][0]
    assert msg["message"]["content"] == ANSWER
    # log-probs for exactly the visible tokens whose characters are all visible; they spell the answer
    toks = [e["token"] for e in msg["logprobs"]["content"]]
    assert "".join(toks) in ANSWER and len("".join(toks)) >= len(ANSWER) - 8
    r = post(url, CHAT, key, {"model": "inline", "messages": U, "stream": True, "n": 2})
    texts = {}
    for c in sse_events(r.text):
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content") or "")
    assert texts == {0: ANSWER, 1: ANSWER}


def test_separate_field_keeps_the_answers_logprobs(rig):
    """An upstream that gives log-probs for reasoning and answer tokens alike while moving the
    reasoning to reasoning_content: the answer's entries survive, the reasoning's do not."""
    _, url, key = rig
    ch = post(url, CHAT, key, {"model": "field", "messages": U, "logprobs": True, "top_logprobs": 1}).json()["choices"][0]
    assert ch["message"]["content"] == ANSWER and "reasoning_content" not in ch["message"]
    toks = [e["token"] for e in ch["logprobs"]["content"]]
    assert toks and "".join(toks) == ANSWER[len(ANSWER) - len("".join(toks)):]


def test_completions_offsets_point_into_the_visible_text(rig):
    _, url, key = rig
    r = post(url, COMP, key, {"model": "inline", "prompt": "Q:", "echo": True, "logprobs": 1})
    ch = r.json()["choices"][0]
    assert ch["text"] == "Q:" + ANSWER
    lp = ch["logprobs"]
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert ch["text"][off : off + len(tok)] == tok


def test_without_the_gateway_the_stub_leaks(rig):
    """The battery can fail: the same requests sent straight to the upstream carry the canary."""
    import httpx

    up_app, url, key = rig
    leaks = sum(any(c in httpx.post(up_app.state.url + path, json=body, timeout=300).text for c in HIDDEN) for _, path, body in ATTACKS)
    assert leaks == len(ATTACKS)


def test_implicit_open_streams_and_length_summary(tmp_path):
    """An R1-style template (only the close marker is generated) streamed: with implicit_open the
    output is hidden from its first token; summary: length says how much, nothing of what."""
    import httpx

    [key] = make_keys(tmp_path / "keys.json", {})
    cfg = guard_config(tmp_path, reasoning={"implicit_open": True, "summary": "length"})
    with upstream_server() as (up_app, up_url), gateway_server(cfg, up_url) as (_, url):
        body = {"model": "r1", "messages": U, "stream": True, "logprobs": True, "top_logprobs": 2}
        assert any(c in httpx.post(up_url + CHAT, json=body, timeout=300).text for c in HIDDEN)  # the upstream does leak
        r = post(url, CHAT, key, body)
        assert not any(c in r.text for c in HIDDEN) and "\\u04" not in r.text
        events = sse_events(r.text)
        assert "".join(ch["delta"].get("content") or "" for c in events for ch in c["choices"]) == ANSWER
        summaries = [ch["delta"]["reasoning_summary"] for c in events for ch in c["choices"] if "reasoning_summary" in ch["delta"]]
        assert len(summaries) == 1 and summaries[0].startswith("[reasoning withheld: ~")
        whole = post(url, CHAT, key, {"model": "r1", "messages": U}).json()["choices"][0]["message"]
        assert whole["content"] == ANSWER and whole["reasoning_summary"].startswith("[reasoning withheld")
