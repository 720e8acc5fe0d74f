"""The training loop: batch building, the LR schedule, and short real training runs."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from stillhouse.scoring import selected_logits
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher, render_chat
from stillhouse.train.loop import Example, TrainConfig, collate, length_batches, lr_at, train

from conftest import build_tiny_model

PAD = 1


def test_collate_marks_positions_that_predict_response_tokens():
    a = Example([10, 11, 12, 13, 14, 15], n_prompt=3)  # response tokens 13, 14, 15
    b = Example([20, 21, 22], n_prompt=2)  # response token 22
    ids, attn, predict, targets, cached = collate([a, b], PAD)
    assert ids.tolist() == [[10, 11, 12, 13, 14, 15], [20, 21, 22, PAD, PAD, PAD]]
    assert attn.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # position p predicts token p + 1: positions 2, 3, 4 of row 0 and position 1 of row 1
    assert predict.tolist() == [
        [False, False, True, True, True, False],
        [False, True, False, False, False, False],
    ]
    assert targets.tolist() == [13, 14, 15, 22]
    assert ids[1:][:, 1:][predict[1:][:, :-1]].tolist() == [22]
    assert cached is None


def test_collate_every_marked_position_predicts_the_next_response_token():
    rng = random.Random(3)
    examples = []
    for _ in range(6):
        n = rng.randint(2, 9)
        examples.append(Example([rng.randint(4, 90) for _ in range(n)], n_prompt=rng.randint(1, n - 1)))
    ids, attn, predict, targets, _ = collate(examples, PAD)
    expected = []
    for r, e in enumerate(examples):
        for p in range(ids.size(1)):
            should = e.n_prompt - 1 <= p < len(e.input_ids) - 1
            assert bool(predict[r, p]) == should, (r, p)
            if should:
                expected.append(e.input_ids[p + 1])
    assert targets.tolist() == expected
    assert predict.sum().item() == sum(len(e.input_ids) - e.n_prompt for e in examples)
    assert not (predict & (attn == 0)).any()


def test_collate_with_zero_prompt_trains_on_every_token_after_the_first():
    e = Example([5, 6, 7, 8], n_prompt=0)
    _, _, predict, targets, _ = collate([e], PAD)
    assert predict.tolist() == [[True, True, True, False]]
    assert targets.tolist() == [6, 7, 8]


def _row(token: int, k: int = 3):
    """A fake top-k row that names the token it belongs to."""
    return [token] + [0] * (k - 1), [-0.1 * token] + [-50.0] * (k - 1)


def test_collate_aligns_cached_topk_rows_with_positions():
    def ex(ids, n_prompt, extra_rows=0):
        rows = [_row(t) for t in ids[n_prompt:]] + [_row(99)] * extra_rows
        return Example(ids, n_prompt, [r[0] for r in rows], [r[1] for r in rows])

    batch = [ex([10, 11, 12, 13, 14], 2), ex([20, 21, 22], 1), ex([30, 31, 32, 33], 3, extra_rows=2)]
    ids, attn, predict, targets, cached = collate(batch, PAD)
    assert cached is not None
    topk_ids, topk_lp = cached.ids, cached.logprobs
    assert topk_ids.shape == (predict.sum().item(), 3)
    assert topk_lp.dtype == torch.float32
    # each row belongs to the token its position predicts, in the row-major order of hidden[mask]
    assert topk_ids[:, 0].tolist() == targets.tolist() == [12, 13, 14, 21, 22, 33]
    torch.testing.assert_close(topk_lp[:, 0], -0.1 * targets.float())


def test_collate_topk_rows_for_zero_prompt_example_follow_the_documented_layout():
    # Example.topk_* hold one row per target token: len(input_ids) - n_prompt rows. With
    # n_prompt = 0 that is one row per token; token 0 is never predicted, so the rows used
    # must be those of tokens 1.. (the positions predict tokens p + 1).
    ids_ = [40, 41, 42, 43]
    rows = [_row(t) for t in ids_]
    e = Example(ids_, 0, [r[0] for r in rows], [r[1] for r in rows])
    _, _, predict, targets, cached = collate([e], PAD)
    assert targets.tolist() == [41, 42, 43]
    assert cached.ids[:, 0].tolist() == targets.tolist()


def test_collate_mixed_cached_and_uncached_gives_no_cache():
    a = Example([1, 2, 3], 1, [[2], [3]], [[0.0], [0.0]])
    b = Example([1, 2, 3], 1)
    assert collate([a, b], PAD)[4] is None


def test_length_batches_cover_every_example_once():
    examples = [Example(list(range(n + 2)), 1) for n in range(37)]
    batches = length_batches(examples, 5, random.Random(0))
    flat = [id(e) for b in batches for e in b]
    assert sorted(flat) == sorted(id(e) for e in examples)
    assert all(1 <= len(b) <= 5 for b in batches)
    assert sum(len(b) == 5 for b in batches) == 7
    # similar lengths in a batch: each batch is a run of the length-sorted window
    for b in batches:
        lengths = sorted(len(e.input_ids) for e in b)
        assert lengths[-1] - lengths[0] == len(b) - 1


def test_lr_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_ratio=0.1)
    total = 100
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))  # warm-up rises linearly
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert max(lrs) == pytest.approx(1.0)
    assert lr_at(total, total, cfg) == pytest.approx(0.1)  # cosine ends at min_lr_ratio * lr
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert min(lrs[10:]) >= 0.1 - 1e-12
    mid = 10 + (total - 10) // 2
    assert lr_at(mid, total, cfg) == pytest.approx(0.55, abs=1e-9)  # half-way down the cosine


def test_lr_without_warmup_and_single_step():
    cfg = TrainConfig(lr=2e-4, min_lr_ratio=0.0, warmup_ratio=0.0)
    assert lr_at(0, 1, cfg) == pytest.approx(2e-4)  # at least one warm-up step, ending at lr
    assert lr_at(1, 10, cfg) == pytest.approx(2e-4)
    assert lr_at(10, 10, cfg) == pytest.approx(0.0, abs=1e-12)


def _prompt_example(tok, question: str, answer: str) -> Example:
    prompt = render_chat(tok, [{"role": "user", "content": question}])
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Example(p + c, len(p))


def _response_loss(model, ex: Example) -> float:
    ids, attn, predict, targets, _ = collate([ex], PAD)
    with torch.no_grad():
        logits = selected_logits(model, ids, attn, predict)
    return torch.nn.functional.cross_entropy(logits, targets).item()


def test_train_sft_lowers_loss_on_repeated_example(tiny):
    model, tok = tiny.model, tiny.tokenizer
    ex = _prompt_example(tok, "What is 3 + 4?", "The answer is 7.")
    before = _response_loss(model, ex)
    cfg = TrainConfig(epochs=6, lr=1e-2, batch_size=4, sft_weight=1.0, kd_weight=0.0, warmup_ratio=0.0, seed=0)
    history = train(model, [ex] * 8, cfg, tok.pad_token_id)
    assert len(history) == 12  # 2 batches per epoch x 6 epochs
    assert [h["step"] for h in history] == list(range(1, 13))
    assert all(math.isfinite(h["loss"]) for h in history)
    assert all(h["kl"] == 0.0 for h in history)
    assert history[0]["loss"] == pytest.approx(before, rel=1e-4)  # first step sees the untrained model
    after = _response_loss(model, ex)
    assert after < 0.7 * before
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["tokens"] == 12 * 4 * len(ex.input_ids)
    assert not model.training  # left in eval mode


def test_train_requires_teacher_signal_for_kd(tiny):
    ex = _prompt_example(tiny.tokenizer, "hi", "there")
    with pytest.raises(ValueError, match="teacher"):
        train(tiny.model, [ex], TrainConfig(kd_weight=0.5), PAD)


def test_train_with_online_teacher(tiny):
    tok = tiny.tokenizer
    examples = [
        _prompt_example(tok, "What is 3 + 4?", "7"),
        _prompt_example(tok, "What is 10 - 8?", "It is 2."),
        _prompt_example(tok, "Add 5 and 6.", "11"),
    ]
    # a teacher identical to the student: the KL of the first step is zero
    twin = copy.deepcopy(tiny.model)
    student = copy.deepcopy(tiny.model)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=3, sft_weight=0.5, kd_weight=0.5, temperature=2.0)
    h = train(student, examples, cfg, tok.pad_token_id, teacher=twin)
    assert len(h) == 1
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert h[0]["loss"] == pytest.approx(0.5 * h[0]["sft"], rel=1e-5)

    # a different teacher: pure KD pulls the student towards it, and the teacher is not trained
    other = build_tiny_model(tok, seed=1)
    teacher_state = {k: v.clone() for k, v in other.state_dict().items()}
    student = tiny.model
    cfg = TrainConfig(epochs=15, lr=1e-2, batch_size=3, sft_weight=0.0, kd_weight=1.0, warmup_ratio=0.0)
    h = train(student, examples, cfg, tok.pad_token_id, teacher=other)
    assert len(h) == 15
    assert h[0]["kl"] > 0.01
    assert h[-1]["kl"] < 0.5 * h[0]["kl"]
    assert h[0]["loss"] == pytest.approx(h[0]["kl"], rel=1e-5)
    for k, v in other.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k


def _cached_examples(teacher_lm, k: int) -> list[Example]:
    tok = teacher_lm.tokenizer
    t = HFTeacher(teacher_lm.model, tok, batch_size=4)
    prompts = [render_chat(tok, [{"role": "user", "content": q}]) for q in ("2+2?", "What is 13 - 5?", "Sum 1, 2 and 3.")]
    outs = t.generate_text(prompts, SamplingParams(max_new_tokens=6), top_k_logprobs=k)
    examples = []
    for text, comps in zip(prompts, outs):
        c = comps[0]
        p = tok(text, add_special_tokens=False)["input_ids"]
        target = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
        assert len(c.topk_ids) == len(target)
        examples.append(Example(p + target, len(p), c.topk_ids, c.topk_logprobs))
    return examples


def test_train_with_cached_topk_rows(tiny, tiny_model_dir):
    from stillhouse import models

    teacher = models.load(str(tiny_model_dir))
    tok = tiny.tokenizer
    # full-vocabulary rows from the same weights: the cached KL must start at ~0, which holds
    # only if every row is aligned with the position that predicts its token
    full = _cached_examples(teacher, k=len(tok))
    student = copy.deepcopy(tiny.model)
    h = train(student, full, TrainConfig(epochs=1, batch_size=3, sft_weight=0.0, kd_weight=1.0), tok.pad_token_id)
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-4)

    # top-8 rows from a different teacher: KD-only training lowers the sparse KL
    other = models.LoadedModel(build_tiny_model(tok, seed=2), tok, teacher.identity)
    cached = _cached_examples(other, k=8)
    cfg = TrainConfig(epochs=15, lr=1e-2, batch_size=3, sft_weight=0.0, kd_weight=1.0, warmup_ratio=0.0)
    h = train(tiny.model, cached, cfg, tok.pad_token_id)
    assert len(h) == 15
    assert all(h_["kl"] >= -1e-6 for h_ in h)
    assert h[-1]["kl"] < 0.5 * h[0]["kl"]
