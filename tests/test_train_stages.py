"""Recipe stages for students and training: width pruning, scratch students, LoRA, checkpoints,
the metrics file, DPO pairs from rows. Runs a small recipe in-process on the tiny teacher."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.train.stages import _pairs

from test_pipeline_tiny import run_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_tiny(tmp_path_factory, "train-stages", {
        "narrow": {"type": "prune", "model": "teacher", "calibration": "traces", "mlp_channels": 40, "kv_heads": 1},
        "fresh": {"type": "scratch", "teacher": "teacher", "layers": 2, "hidden_size": 16, "heads": 2},
        "adapted": {"type": "train", "student": "narrow", "data": "traces", "epochs": 2, "batch_size": 4,
                    "micro_batch_size": 2, "lr": 1e-3, "checkpoint_every": 1, "lora": {"r": 4, "alpha": 8}},
        "from_scratch": {"type": "train", "student": "fresh", "data": "traces", "epochs": 1, "batch_size": 4,
                         "kd_weight": 0.0, "sft_weight": 1.0},
        "lean": {"type": "train", "student": "narrow", "data": "traces", "epochs": 2, "batch_size": 4,
                 "lr": 1e-3, "low_memory": True, "grad_clip": 0},
    })


def test_width_pruned_student_is_a_plain_hf_model(run):
    art = run["results"]["narrow"]
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert model.config.intermediate_size == 40 and model.config.num_key_value_heads == 1
    m = art.manifest["metrics"]
    assert m["params_after"] < m["params_before"] and m["mlp_channels"] == 40 and m["kv_heads"] == 1
    assert "kept_layers" not in m  # no depth pruning asked


def test_scratch_student_uses_the_teachers_tokenizer(run):
    art = run["results"]["fresh"]
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(art.path).get_vocab() == AutoTokenizer.from_pretrained(run["teacher"]).get_vocab()
    trained = run["results"]["from_scratch"]
    assert trained.manifest["metrics"]["final_sft"] > 0


def test_a_low_memory_stage_trains_every_weight_and_saves_a_plain_model(run):
    art = run["results"]["lean"]
    model = AutoModelForCausalLM.from_pretrained(art.path)
    base = AutoModelForCausalLM.from_pretrained(run["results"]["narrow"].path)
    assert all(not torch.equal(p, base.state_dict()[n]) for n, p in model.named_parameters())
    assert model.get_input_embeddings().sparse is False
    rows = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all(r["grad_norm"] is None for r in rows)  # no clipping in this mode
    assert all(r["kl"] > 0 and r["sft"] > 0 for r in rows)


def test_lora_training_merges_into_a_plain_model_and_logs_each_term(run):
    art = run["results"]["adapted"]
    assert not (art.path / "adapter_config.json").exists()  # merged: no adapter left
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(run["results"]["narrow"].path)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved
    m = art.manifest["metrics"]
    assert 0 < m["lora_trainable_share"] < 0.5
    rows = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all({"loss", "sft", "kl", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in rows)
    # checkpoints were written during training and removed once the model was saved
    assert not (run["root"] / "ws" / "checkpoints" / f"adapted-{art.id}").exists()


def test_dpo_rows_become_pairs_from_ids_or_text(tiny):
    tok = tiny.tokenizer
    pairs = _pairs([{"prompt": "Q: 1+1?", "chosen": "2", "rejected": "3"},
                    {"prompt": "x", "chosen": "y", "rejected": "z", "prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7]}], tok)
    assert pairs[0].prompt_ids == tok("Q: 1+1?", add_special_tokens=False)["input_ids"]
    assert pairs[0].chosen_ids[-1] == tok.eos_token_id and pairs[0].chosen_ids[:-1] == tok("2", add_special_tokens=False)["input_ids"]
    assert (pairs[1].prompt_ids, pairs[1].chosen_ids, pairs[1].rejected_ids) == ([5], [6], [7])


def test_new_recipe_fields_are_validated():
    base = {"name": "r", "models": {"t": "smollm2-135m-instruct"},
            "stages": {"p": {"type": "tasks", "task": "chain_sum", "train": {"size": 2}, "eval": {"size": 2}}}}

    def stage(**st):
        return {**base, "stages": {**base["stages"], "s": st}}

    with pytest.raises(StillhouseError, match="needs layers, mlp_channels or kv_heads"):
        parse_recipe(stage(type="prune", model="t", calibration="p"))
    with pytest.raises(StillhouseError, match=r"stages\.s\.objective"):
        parse_recipe(stage(type="train", student="t", data="p", objective="ppo"))
    with pytest.raises(StillhouseError, match=r"stages\.s\.lora\.r"):
        parse_recipe(stage(type="train", student="t", data="p", lora={"r": 0}))
    with pytest.raises(StillhouseError, match=r"stages\.s\.hidden_size: Field required"):
        parse_recipe(stage(type="scratch", teacher="t", layers=2, heads=2))
    ok = parse_recipe(stage(type="train", student="t", data="p", micro_batch_size=2, checkpoint_every=5, objective="dpo"))
    assert ok.stages["s"].checkpoint_every == 5
