"""Teacher and student must see the same tokens: vocabulary padding, recipe schema of the white-box stages."""

from __future__ import annotations

import pytest

from stillhouse import models
from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.train.config import LossName
from stillhouse.train import alignment
from stillhouse.train.loop import Example, TrainConfig, train
from stillhouse.train.losses import LOSS_NAMES

from conftest import build_tiny_model, build_tokenizer


def test_padded_output_layers_are_aligned_on_the_tokenizer_and_reported():
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    student = build_tiny_model(tok, seed=1, layers=2)
    teacher = build_tiny_model(tok, seed=0)
    teacher.resize_token_embeddings(len(tok) + 8, mean_resizing=False)  # padded to a round size
    vocab, note = alignment.shared_vocab(tok, student, teacher)
    assert vocab == len(tok)
    assert note == f"aligning logits on the tokenizer's {len(tok)} tokens (output layers: {len(tok)}, {len(tok) + 8})"
    assert alignment.shared_vocab(tok, student) == (len(tok), None)
    ids = tok("hello there, 12+3=15", add_special_tokens=False)["input_ids"]
    examples = [Example(ids, 3), Example(ids[:9], 2)]
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-3, sft_weight=0.5, kd_weight=0.5)
    with pytest.raises(StillhouseError, match="vocabularies differ"):  # unaligned: the two widths differ
        train(student, examples, cfg, tok.pad_token_id, teacher=teacher)
    hist = train(student, examples, TrainConfig(**{**cfg.to_dict(), "vocab_size": vocab}), tok.pad_token_id, teacher=teacher)
    assert len(hist) == 2 and all(h["kl"] > 0 for h in hist)
    small = build_tiny_model(tok, seed=2, layers=1)
    small.resize_token_embeddings(len(tok) - 4, mean_resizing=False)
    with pytest.raises(StillhouseError, match="fewer than its tokenizer's"):
        alignment.shared_vocab(tok, small)


def test_recipe_loss_names_are_the_registry():
    from typing import get_args

    assert set(get_args(LossName)) == set(LOSS_NAMES)


def _recipe(**train_fields):
    return {"name": "x", "models": {"t": "smollm2-135m-instruct"}, "stages": {
        "p": {"type": "tasks", "task": "chain_sum", "train": {"size": 4}, "eval": {"size": 2}},
        "tr": {"type": "rejection", "teacher": "t", "tasks": "p"},
        "c": {"type": "cache_logits", "teacher": "t", "data": "tr", "top_k": 64},
        "k": {"type": "train", "student": "t", "data": "tr", **train_fields}}}


def test_train_loss_forms_and_legacy_weights():
    r = parse_recipe(_recipe(loss={"sft": 0.3, "skew_reverse_kl": 0.7}, logit_cache="c"))
    assert r.stages["k"].loss_terms == [{"name": "sft", "weight": 0.3, "beta": 0.5, "alpha": 0.1},
                                        {"name": "skew_reverse_kl", "weight": 0.7, "beta": 0.5, "alpha": 0.1}]
    assert "c" in r.stage_deps("k") and r.order().index("c") < r.order().index("k")
    r = parse_recipe(_recipe(loss=[{"name": "jsd", "weight": 1, "beta": 0.9}]))
    assert r.stages["k"].loss_terms == [{"name": "jsd", "weight": 1.0, "beta": 0.9, "alpha": 0.1}]
    assert r.stages["k"].uses_teacher
    r = parse_recipe(_recipe(sft_weight=1.0, kd_weight=0.0))
    assert r.stages["k"].loss_terms == [{"name": "sft", "weight": 1.0}, {"name": "forward_kl", "weight": 0.0}]
    assert not r.stages["k"].uses_teacher


@pytest.mark.parametrize("fields,message", [
    ({"loss": {"sft": 0}}, "stages.k.loss: needs at least one term with a positive weight"),
    ({"loss": {"kl": 1}}, "stages.k.loss: unknown loss 'kl' (known: sft, forward_kl"),
    ({"loss": [{"name": "jsd", "beta": 1.5}]}, "stages.k.loss.0.beta: Input should be less than or equal to 1"),
    ({"loss": [{"name": "tv", "scale": 1}]}, "stages.k.loss.0.scale: unknown key"),
    ({"logit_cache": "tr"}, "stages.k.logit_cache: stage 'tr' produces a dataset, not a logit_cache"),
    ({"logit_cache": "nope"}, "stages.k.logit_cache: unknown stage 'nope'"),
])
def test_bad_train_objectives_are_one_line_errors(fields, message):
    with pytest.raises(StillhouseError) as e:
        parse_recipe(_recipe(**fields), "r.yaml")
    assert str(e.value).startswith("r.yaml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_new_stage_types_validate():
    base = _recipe()
    base["stages"]["o"] = {"type": "onpolicy", "student": "t", "teacher": "t", "data": "tr", "method": "ppo"}
    with pytest.raises(StillhouseError, match="stages.o.method"):
        parse_recipe(base, "r.yaml")
    base["stages"]["o"] = {"type": "cross_tokenizer", "student": "t", "teacher": "gemma3-270m", "data": "tr", "top_k": 0}
    with pytest.raises(StillhouseError, match="stages.o.top_k"):
        parse_recipe(base, "r.yaml")
    base["stages"]["c"]["top_k"] = 1000
    base["stages"].pop("o")
    with pytest.raises(StillhouseError, match="stages.c.top_k"):
        parse_recipe(base, "r.yaml")
