"""Cross-tokenizer distillation with two tiny llamas whose tokenizers split text differently."""

from __future__ import annotations

import copy

import pytest

from stillhouse import models
from stillhouse.errors import StillhouseError
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher
from stillhouse.train import alignment
from stillhouse.train.cross_tokenizer import CrossConfig, aligned_pairs, encode_side, prepare, train_cross, uld_distance

from conftest import CHARS, CHAT_TEMPLATE, build_tiny_model, build_tokenizer

MERGES = [("1", "2"), ("t", "h"), ("h", "e"), ("th", "e"), ("i", "s"), (" ", "i"), ("a", "n"), ("+", " ")]


def build_merged_tokenizer():
    """Another tokenizer: other special-token ids, other character ids, and merged tokens."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<unk>", "<|im_start|>"]
    tokens = specials + list(reversed(CHARS)) + ["".join(m) for m in MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(tk_models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_the_two_tokenizers_differ_and_token_level_kd_is_refused():
    a, b = build_tokenizer(), build_merged_tokenizer()
    assert len(a(" is the 12+ 3")["input_ids"]) > len(b(" is the 12+ 3")["input_ids"])
    assert not alignment.same_tokenizer(a, b)
    with pytest.raises(StillhouseError, match="different tokenizers.*token-level KD needs one tokenizer"):
        alignment.check_token_level(a, b, "stages.kd", "student", "teacher")
    alignment.check_token_level(a, build_tokenizer(), "stages.kd")  # the same tokenizer passes


def test_template_mismatch_is_refused():
    a, b = build_tokenizer(), build_tokenizer()
    b.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|>[x]")
    with pytest.raises(StillhouseError, match="different chat templates"):
        alignment.check_token_level(a, b, "stages.kd")


def test_aligned_pairs_share_a_character_offset():
    s_tok, t_tok = build_tokenizer(), build_merged_tokenizer()
    text = "the answer is 12+ 30, then 1212"
    msgs = [{"role": "user", "content": "q"}]
    s = encode_side(s_tok, msgs, text, s_tok.eos_token_id)
    t = encode_side(t_tok, msgs, text, t_tok.eos_token_id)
    pairs = aligned_pairs(s, t)
    assert len(s.completion_ids) == len(text) + 1  # character-level student, + end token
    assert len(t.completion_ids) < len(s.completion_ids)
    # every teacher token start is also a student start, so every teacher token is aligned once
    assert [j for _, j in pairs] == list(range(len(t.completion_ids)))
    for i, j in pairs:
        assert s.starts[i] == t.starts[j]
        assert text[s.starts[i]:].startswith(t_tok.decode([t.completion_ids[j]])) or j == len(t.completion_ids) - 1
    assert pairs[-1] == (len(s.completion_ids) - 1, len(t.completion_ids) - 1)  # the end tokens


def _records(teacher, t_tok, n=12):
    gen = HFTeacher(teacher, t_tok, batch_size=n)
    questions = [f"{a}+{b}=" for a, b in zip(range(n), range(3, 3 + n))]
    outs = gen.generate([[{"role": "user", "content": q}] for q in questions],
                        SamplingParams(max_new_tokens=10, temperature=1.0, seed=2))
    return [([{"role": "user", "content": q}], o[0].text) for q, o in zip(questions, outs)]


def test_uld_brings_the_student_closer_to_a_teacher_with_another_tokenizer():
    s_tok, t_tok = build_tokenizer(), build_merged_tokenizer()
    models.prepare_tokenizer(s_tok)
    models.prepare_tokenizer(t_tok)
    teacher = build_tiny_model(t_tok, seed=3)
    student = build_tiny_model(s_tok, seed=4, layers=2)
    records = _records(teacher, t_tok)
    assert any(r[1] for r in records)
    cfg = CrossConfig(epochs=8, lr=5e-3, batch_size=4, top_k=32, uld_weight=1.0, sft_weight=1.0)
    prepared = prepare(s_tok, t_tok, teacher, records, cfg)
    assert all(e.sorted_top.shape == (len(e.sorted_rows), 32) and e.sorted_rest.shape == (len(e.sorted_rows),)
               for e in prepared)
    assert 0.5 < sum(len(e.sorted_rows) for e in prepared) / sum(len(e.input_ids) - e.n_prompt for e in prepared) <= 1
    before = uld_distance(student, s_tok.pad_token_id, prepared, cfg)
    sft_only, uld_only = copy.deepcopy(student), copy.deepcopy(student)
    hist = train_cross(student, s_tok.pad_token_id, prepared, cfg)
    train_cross(sft_only, s_tok.pad_token_id, prepared, CrossConfig(**{**cfg.__dict__, "uld_weight": 0.0}))
    train_cross(uld_only, s_tok.pad_token_id, prepared, CrossConfig(**{**cfg.__dict__, "sft_weight": 0.0}))
    with_uld = uld_distance(student, s_tok.pad_token_id, prepared, cfg)
    without = uld_distance(sft_only, s_tok.pad_token_id, prepared, cfg)
    # SFT on a random teacher's text sharpens the student away from the teacher's (flat)
    # distributions; the ULD term counters that, and alone it moves the student towards them
    assert with_uld < without, (with_uld, without)
    assert uld_distance(uld_only, s_tok.pad_token_id, prepared, cfg) < 0.7 * before
    assert hist[-1]["sft"] < hist[0]["sft"]  # sequence-level KD learns the teacher's text too
    assert all(h["loss/uld"] > 0 for h in hist)  # the two terms are logged apart


def test_collate_sorted_maps_rows_onto_the_collated_target_positions():
    import torch

    from stillhouse.train.loop import Example, collate, collate_sorted

    def ex(n_tokens, n_prompt, rows):
        e = Example(list(range(3, 3 + n_tokens)), n_prompt)
        e.sorted_rows = rows
        e.sorted_top = torch.tensor([[float(r), 0.0] for r in rows]).reshape(-1, 2)
        e.sorted_rest = torch.tensor([float(r) for r in rows])
        return e

    # example 0: 2 prompt tokens, 4 targets (rows 0..3); example 1: no prompt, so its row 0
    # (the first token) has no predicting position and row r sits at collated index r - 1
    batch = [ex(6, 2, [0, 2, 3]), ex(4, 0, [0, 1, 3])]
    ids, attn, predict, targets, _ = collate(batch, pad_id=0)
    got = collate_sorted(batch)
    assert got.rows.tolist() == [0, 2, 3, 4, 6]
    assert got.rest.tolist() == [0.0, 2.0, 3.0, 1.0, 3.0]
    # the row's target token is the one the teacher scored: token n_prompt + r of its example
    assert targets[got.rows].tolist() == [3 + 2 + 0, 3 + 2 + 2, 3 + 2 + 3, 3 + 1, 3 + 3]
    # rows cut off by truncation are dropped
    short = [ex(4, 2, [0, 1, 2, 3])]
    assert collate_sorted(short).rows.tolist() == [0, 1]


def test_uld_term_in_the_mixture_is_the_sorted_distance_on_its_rows():
    import torch

    from stillhouse.train.losses import LossTerm, SortedProbs, mixture, sorted_probs, sorted_wasserstein

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g)
    top, rest = sorted_probs(torch.randn(3, 17, generator=g), 5)
    sig = SortedProbs(torch.tensor([1, 4, 5]), top, rest)
    targets = torch.randint(0, 11, (6,), generator=g)
    total, parts = mixture([LossTerm("sft", 0.5), LossTerm("uld", 2.0)], logits, targets, None, reduction="sum",
                           sorted_teacher=sig)
    want = sorted_wasserstein(logits[[1, 4, 5]], top, rest, reduction="sum")
    assert parts["uld"] == pytest.approx(want.item())
    assert want.item() == pytest.approx(3 * sorted_wasserstein(logits[[1, 4, 5]], top, rest).item())
    assert total.item() == pytest.approx(0.5 * parts["sft"] + 2.0 * want.item())
    with pytest.raises(ValueError, match="uld.*sorted probabilities"):
        mixture([LossTerm("uld", 1.0)], logits, targets, None)


def test_cross_tokenizer_training_accumulates_like_one_batch_and_needs_its_signal():
    from stillhouse.train.loop import Example

    s_tok, t_tok = build_tokenizer(), build_merged_tokenizer()
    models.prepare_tokenizer(s_tok)
    models.prepare_tokenizer(t_tok)
    teacher = build_tiny_model(t_tok, seed=3)
    cfg = CrossConfig(epochs=2, lr=5e-3, batch_size=4, top_k=16)
    examples = prepare(s_tok, t_tok, teacher, _records(teacher, t_tok, n=8), cfg)
    whole = train_cross(build_tiny_model(s_tok, seed=4, layers=2), s_tok.pad_token_id, examples, cfg)
    micro = train_cross(build_tiny_model(s_tok, seed=4, layers=2), s_tok.pad_token_id, examples,
                        CrossConfig(**{**cfg.__dict__, "micro_batch_size": 1}))
    assert len(whole) == len(micro) == 4
    for a, b in zip(whole, micro):
        assert b["loss/uld"] == pytest.approx(a["loss/uld"], rel=1e-4)
        assert b["sft"] == pytest.approx(a["sft"], rel=1e-4)
    bare = [Example(e.input_ids, e.n_prompt) for e in examples]
    with pytest.raises(ValueError, match="uld loss term needs the teacher's sorted probabilities"):
        train_cross(build_tiny_model(s_tok, seed=4, layers=2), s_tok.pad_token_id, bare, cfg)
