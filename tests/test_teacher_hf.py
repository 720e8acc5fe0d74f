"""The transformers teacher backend: batching, ordering, sampling and top-k log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.decode import gumbel_sample, top_p_filter
from stillhouse.teachers.hf import HFTeacher, render_chat

# deliberately of different lengths and not in length order: the teacher sorts internally
QUESTIONS = [
    "Sum 1, 2 and 3, then explain every step of the calculation.",
    "2+2?",
    "What is 13 - 5?",
    "x",
    "Subtract 7 from 40 and add 1.",
]


@pytest.fixture
def teacher(tiny):
    return HFTeacher(tiny.model, tiny.tokenizer, name="tiny", batch_size=4)


def _prompts(tok, questions=QUESTIONS):
    return [render_chat(tok, [{"role": "user", "content": q}]) for q in questions]


def test_render_chat_uses_template(tiny):
    text = render_chat(tiny.tokenizer, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_render_chat_without_template(tiny):
    tok = tiny.tokenizer
    tok.chat_template = None
    assert render_chat(tok, [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_stop_ids_include_end_of_turn(teacher, tiny):
    tok = tiny.tokenizer
    stops = teacher._stop_ids()
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert tok.unk_token_id not in stops  # tokens the vocabulary lacks map to <unk>: not a stop


@pytest.mark.parametrize("n,temperature", [(1, 0.0), (3, 1.0)])
def test_completions_come_back_in_prompt_order(teacher, tiny, n, temperature):
    tok = tiny.tokenizer
    prompts = _prompts(tok)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths != sorted(lengths) and len(set(lengths)) == len(lengths)
    params = SamplingParams(max_new_tokens=5, temperature=temperature, n=n, seed=3)
    out = teacher.generate_text(prompts, params)
    assert len(out) == len(prompts)
    for comps, length in zip(out, lengths):
        assert len(comps) == n
        for c in comps:
            assert c.prompt_tokens == length
            assert len(c.token_ids) <= 5
            assert c.finish_reason in ("stop", "length")
            assert (c.stop_token is not None) == (c.finish_reason == "stop")
            assert len(c.token_ids) == 5 or c.finish_reason == "stop"
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert teacher.stats["generated_tokens"] == sum(len(c.token_ids) for comps in out for c in comps)


def test_batched_greedy_equals_one_prompt_at_a_time(teacher, tiny):
    """Left padding and the length sort must not change what each prompt gets."""
    prompts = _prompts(tiny.tokenizer)
    params = SamplingParams(max_new_tokens=6)
    batched = teacher.generate_text(prompts, params)
    single = [teacher.generate_text([p], params)[0] for p in prompts]
    assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]
    # the tiny model's greedy answers differ between prompts, so the order is really checked
    assert len({tuple(b[0].token_ids) for b in batched}) > 1


def test_generate_messages_matches_generate_text(teacher, tiny):
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    params = SamplingParams(max_new_tokens=4)
    a = teacher.generate(msgs, params)
    b = teacher.generate_text(_prompts(tiny.tokenizer, QUESTIONS[:3]), params)
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]


def test_greedy_is_deterministic(teacher, tiny):
    prompts = _prompts(tiny.tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, n=2)
    a = teacher.generate_text(prompts, params)
    b = teacher.generate_text(prompts, params)
    assert [[c.token_ids for c in x] for x in a] == [[c.token_ids for c in x] for x in b]
    for comps in a:  # greedy: the n rows of a prompt are identical
        assert comps[0].token_ids == comps[1].token_ids


def _ids(out):
    return [[c.token_ids for c in comps] for comps in out]


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(teacher, tiny):
    prompts = _prompts(tiny.tokenizer)
    p0 = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=0)
    p1 = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1)
    a = _ids(teacher.generate_text(prompts, p0))
    b = _ids(teacher.generate_text(prompts, p0))
    c = _ids(teacher.generate_text(prompts, p1))
    assert a == b
    assert a != c
    # samples of one prompt differ from each other, and from greedy
    greedy = _ids(teacher.generate_text(prompts, SamplingParams(max_new_tokens=8)))
    assert any(len({tuple(x) for x in comps}) > 1 for comps in a)
    assert a != [[g[0]] * 3 for g in greedy]


def _reference_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    start = len(prompt_ids) - 1
    return lp[start : start + len(completion_ids)]


def test_top_k_logprobs_rows_are_the_models_distribution(teacher, tiny):
    tok = tiny.tokenizer
    prompts = _prompts(tok)
    k = 5
    out = teacher.generate_text(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=0), top_k_logprobs=k)
    stopped = 0
    for text, comps in zip(prompts, out):
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        for c in comps:
            n_rows = len(c.token_ids) + (1 if c.finish_reason == "stop" else 0)
            stopped += c.finish_reason == "stop"
            assert len(c.topk_ids) == len(c.topk_logprobs) == n_rows
            target = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
            ref = _reference_logprobs(tiny.model, p_ids, target)
            for row_ids, row_lp, ref_row in zip(c.topk_ids, c.topk_logprobs, ref):
                assert len(row_ids) == len(row_lp) == k
                assert len(set(row_ids)) == k
                assert row_lp == sorted(row_lp, reverse=True)
                assert all(x <= 0.0 for x in row_lp)
                assert torch.logsumexp(torch.tensor(row_lp), 0).item() <= 1e-5
                want_lp, want_ids = ref_row.topk(k)
                torch.testing.assert_close(torch.tensor(row_lp), want_lp, rtol=1e-4, atol=1e-4)
                assert set(row_ids) == set(want_ids.tolist())
    assert stopped > 0, "no sample stopped: the stop-row case went untested (change the seed)"


def test_top_k_logprobs_full_vocab_sums_to_one(teacher, tiny):
    V = len(tiny.tokenizer)
    out = teacher.generate_text(_prompts(tiny.tokenizer)[:2], SamplingParams(max_new_tokens=3), top_k_logprobs=V)
    for comps in out:
        c = comps[0]
        assert len(c.topk_ids) == 3
        for row_lp, row_ids in zip(c.topk_logprobs, c.topk_ids):
            assert sorted(row_ids) == list(range(V))
            assert math.exp(torch.logsumexp(torch.tensor(row_lp), 0).item()) == pytest.approx(1.0, abs=1e-4)
        # greedy: each generated token is the top-1 of its row
        assert [row[0] for row in c.topk_ids] == c.token_ids


def test_no_top_k_without_request(teacher, tiny):
    out = teacher.generate_text(_prompts(tiny.tokenizer)[:2], SamplingParams(max_new_tokens=2))
    assert all(c.topk_ids is None and c.topk_logprobs is None for comps in out for c in comps)


# -- the sampler -----------------------------------------------------------------------------
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 20_000


def _frequencies(temperature, top_p, generator, logits=LOGITS):
    picks = gumbel_sample(logits.unsqueeze(0).expand(DRAWS, -1), temperature, top_p, generator)
    return torch.bincount(picks, minlength=logits.numel()).float() / DRAWS


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_gumbel_sampler_frequencies_match_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    freq = _frequencies(temperature, 1.0, g)
    expected = torch.softmax(LOGITS / temperature, -1)
    assert (freq - expected).abs().max().item() < 0.02, (freq, expected)


def test_gumbel_sampler_with_top_p_removes_the_tail():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(LOGITS, -1)  # ~ .56 .21 .13 .08 .03 .004
    freq = _frequencies(1.0, 0.85, g)
    # smallest prefix reaching 0.85: the first three tokens (0.56 + 0.21 + 0.13 = 0.90)
    assert probs[:2].sum() < 0.85 < probs[:3].sum()
    assert freq[3:].sum().item() == 0.0
    expected = probs[:3] / probs[:3].sum()
    assert (freq[:3] - expected).abs().max().item() < 0.02


def test_gumbel_sampler_is_seeded():
    s = LOGITS.repeat(50, 1)
    draw = lambda seed: gumbel_sample(s, 1.0, 1.0, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


def test_top_p_filter_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose
    scores = probs.log().unsqueeze(0)
    kept = lambda p: torch.isfinite(top_p_filter(scores, p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(0.97) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    # kept scores are unchanged
    out = top_p_filter(scores, 0.6)
    assert out[0, 1] == scores[0, 1] and out[0, 3] == scores[0, 3]


def test_top_p_filter_rows_are_independent():
    scores = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = top_p_filter(scores, 0.8)
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]  # p(first) ~ 0.87
    assert torch.isfinite(out[1]).sum().item() == 4  # uniform: needs all four to reach 0.8


def test_shared_prompt_prefill_matches_separate_decoding(teacher, tiny):
    """n > 1 encodes each prompt once and copies its KV cache: every copy must decode like n = 1."""
    prompts = _prompts(tiny.tokenizer)
    single = teacher.generate_text(prompts, SamplingParams(max_new_tokens=8))
    shared = teacher.generate_text(prompts, SamplingParams(max_new_tokens=8, n=3))
    for one, many in zip(single, shared):
        assert len(many) == 3
        assert all(c.token_ids == one[0].token_ids for c in many)


def test_prompts_get_a_bos_unless_the_template_already_starts_with_it():
    from types import SimpleNamespace

    from stillhouse.teachers.hf import needs_special_tokens

    base = SimpleNamespace(bos_token="<bos>")
    assert needs_special_tokens(base, "The capital of France is")  # raw text for a base model
    assert not needs_special_tokens(base, "<bos><start_of_turn>user\nhi")  # a rendered template
    assert needs_special_tokens(SimpleNamespace(bos_token=None), "anything")  # nothing to double


def test_one_token_prompts_sample_without_a_shared_prefill(teacher, tiny):
    tok = tiny.tokenizer
    one = tok.convert_ids_to_tokens([tok("x", add_special_tokens=False)["input_ids"][0]])[0]
    out = teacher.generate_text([tok.convert_tokens_to_string([one])], SamplingParams(max_new_tokens=3, n=2, temperature=1.0))
    assert len(out) == 1 and len(out[0]) == 2


def test_every_backend_is_built_from_its_own_config_object(tiny_model_dir):
    import importlib

    from stillhouse.teachers.config import BACKENDS
    from stillhouse.teachers.factory import BACKEND_CLASSES, make_teacher

    assert set(BACKEND_CLASSES) == set(BACKENDS)
    for backend, where in BACKEND_CLASSES.items():
        module, cls = where.split(":")
        assert "from_config" in vars(getattr(importlib.import_module(f"stillhouse.teachers.{module}"), cls)), backend
    loaded = []

    def loader(spec):
        from stillhouse import models

        loaded.append(spec)
        return models.load(spec)

    t = make_teacher({"backend": "hf", "model": str(tiny_model_dir), "batch_size": 3}, name="tiny", loader=loader)
    assert isinstance(t, HFTeacher) and t.batch_size == 3 and t.name == "tiny" and loaded == [str(tiny_model_dir)]
    # a stage's own batch size replaces the declaration's; an option the backend lacks does not apply
    assert make_teacher(str(tiny_model_dir), batch_size=5, n_ctx=128).batch_size == 5
