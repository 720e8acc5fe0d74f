"""The lean decoding loop: same tokens as transformers' generate, rows leave the batch correctly."""

from __future__ import annotations

import torch

from stillhouse.teachers.decode import decode, prefill
from stillhouse.teachers.hf import encode_prompt, render_chat

QUESTIONS = ["Sum 1, 2 and 3 and explain.", "2+2?", "What is 13 - 5 then?", "x"]


def _batch(tok, questions=QUESTIONS):
    enc = [encode_prompt(tok, render_chat(tok, [{"role": "user", "content": q}])) for q in questions]
    width = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    return enc, ids, attn


def test_greedy_batch_matches_generate_one_prompt_at_a_time(tiny):
    model, tok = tiny.model, tiny.tokenizer
    enc, ids, attn = _batch(tok)
    rows = decode(model, ids, attn, max_new_tokens=6, stop_ids=[tok.eos_token_id])
    for e, row in zip(enc, rows):
        ref = model.generate(torch.tensor([e]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(e):].tolist()
        assert row.token_ids == ref[: len(row.token_ids)]
        assert row.stopped == (ref[len(row.token_ids) - 1] == tok.eos_token_id)


def test_rows_that_stop_leave_the_batch_without_disturbing_the_others(tiny):
    model, tok = tiny.model, tiny.tokenizer
    _, ids, attn = _batch(tok)
    free = decode(model, ids, attn, max_new_tokens=8, stop_ids=[tok.eos_token_id])
    # make row 0's third token a stop token: row 0 ends there, the rows that never emit it
    # must decode exactly as before although the batch (and KV cache) shrank under them
    stop = free[0].token_ids[2]
    cut = decode(model, ids, attn, max_new_tokens=8, stop_ids=[tok.eos_token_id, stop])
    first = free[0].token_ids.index(stop)
    assert cut[0].token_ids == free[0].token_ids[: first + 1] and cut[0].stopped
    untouched = [r for r in range(len(free)) if stop not in free[r].token_ids]
    for r in untouched:
        assert cut[r].token_ids == free[r].token_ids
    for r in range(len(free)):
        if r not in untouched:
            k = free[r].token_ids.index(stop)
            assert cut[r].token_ids == free[r].token_ids[: k + 1] and cut[r].stopped
    assert len(cut[0].token_ids) < 8


def test_sampling_is_seeded_and_top_k_covers_every_step(tiny):
    model, tok = tiny.model, tiny.tokenizer
    _, ids, attn = _batch(tok)
    run = lambda seed: decode(  # noqa: E731
        model, ids, attn, max_new_tokens=5, stop_ids=[tok.eos_token_id], temperature=1.0,
        generator=torch.Generator().manual_seed(seed), top_k_logprobs=3,
    )
    a, b = run(1), run(1)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for r in a:
        assert len(r.topk_ids) == len(r.token_ids) and all(len(k) == 3 for k in r.topk_ids)
        assert all(lp[0] >= lp[1] >= lp[2] for lp in r.topk_logprobs)
        assert all(lp[0] <= 0 for lp in r.topk_logprobs)


def test_a_given_cache_continues_from_the_last_prompt_token(tiny):
    model, tok = tiny.model, tiny.tokenizer
    _, ids, attn = _batch(tok)
    plain = decode(model, ids, attn, max_new_tokens=4, stop_ids=[tok.eos_token_id])
    cache = prefill(model, ids, attn)
    cache.batch_repeat_interleave(2)
    twice = decode(model, ids.repeat_interleave(2, 0), attn.repeat_interleave(2, 0), max_new_tokens=4,
                   stop_ids=[tok.eos_token_id], cache=cache)
    assert [r.token_ids for r in twice] == [r.token_ids for p in plain for r in (p, p)]
