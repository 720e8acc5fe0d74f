"""QLoRA: a student with 4-bit linear weights (bitsandbytes, which runs on CPU since 0.49)
trains LoRA adapters; merging folds them into the full-precision base, so the saved model is
a plain HF model. bitsandbytes' 4-bit blocks are 64 values wide: the student here has
hidden size 64 (the other tests' tiny llama has 32)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from stillhouse import models
from stillhouse.errors import StillhouseError

from test_pipeline_tiny import run_tiny

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_tiny(tmp_path_factory, "qlora", {
        "wide": {"type": "scratch", "teacher": "teacher", "layers": 2, "hidden_size": 64, "heads": 4,
                 "intermediate_size": 128},
        "q": {"type": "train", "student": "wide", "data": "traces", "epochs": 3, "batch_size": 4, "lr": 5e-3,
              "sft_weight": 1.0, "kd_weight": 0.0,
              "lora": {"r": 4, "alpha": 8, "quantize": "nf4", "target_modules": ["q_proj", "v_proj", "up_proj"]}},
    })


def test_four_bit_load_quantises_the_linear_layers_only(run):
    import bitsandbytes as bnb

    path = str(run["results"]["wide"].path)
    full, q = models.load(path).model, models.load(path, quantize="nf4").model
    layer = q.model.layers[0]
    assert isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit) and isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit)
    # the same weights up to 4-bit rounding (NF4: 16 levels per 64-value block)
    w4 = layer.mlp.up_proj.weight
    w = full.model.layers[0].mlp.up_proj.weight.detach()
    err = (bnb.functional.dequantize_4bit(w4.data, w4.quant_state) - w).norm() / w.norm()
    assert 0 < err < 0.15
    torch.testing.assert_close(q.lm_head.weight, full.lm_head.weight)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert q(ids).logits.shape == full(ids).logits.shape


def test_qlora_trains_adapters_and_merges_them_into_the_full_precision_base(run):
    art = run["results"]["q"]
    m = art.manifest["metrics"]
    assert 0 < m["lora_trainable_share"] < 0.2
    hist = [h for h in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) > 2 and m["final_sft"] < float(__import__("json").loads(hist[0])["sft"])
    merged = AutoModelForCausalLM.from_pretrained(art.path)  # plain transformers, no bitsandbytes
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(run["results"]["wide"].path)
    for name in ("q_proj", "v_proj", "up_proj"):
        w = dict(merged.named_parameters())[f"model.layers.0.{'mlp' if name == 'up_proj' else 'self_attn'}.{name}.weight"]
        w0 = dict(base.named_parameters())[f"model.layers.0.{'mlp' if name == 'up_proj' else 'self_attn'}.{name}.weight"]
        delta = (w - w0).detach()
        # full-precision base + the adapters' low-rank update (rank <= r), no 4-bit rounding
        assert 0 < torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 4, name
    untouched = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(dict(merged.named_parameters())[untouched], dict(base.named_parameters())[untouched])


def test_four_bit_without_bitsandbytes_is_a_clear_error(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(StillhouseError, match=r"QLoRA\) need bitsandbytes: pip install 'stillhouse\[qlora\]'"):
        models.load(str(run["results"]["wide"].path), quantize="nf4")


def test_qlora_checkpoints_hold_the_adapters_and_resume_reproduces_the_run(run, tmp_path):
    from safetensors.torch import load_file

    from stillhouse.train import checkpoint as ckpt
    from stillhouse.train import lora
    from stillhouse.train.loop import Example, TrainConfig, train

    path = str(run["results"]["wide"].path)
    tok = models.load(path).tokenizer
    examples = [Example(tok(f"what is {i}+{i}? it is {2 * i}")["input_ids"], 4) for i in range(8)]
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, sft_weight=1.0, kd_weight=0.0, checkpoint_every=1)

    def student():
        return lora.add_lora(models.load(path, quantize="nf4").model, 4, 8)

    want = train(student(), examples, cfg, tok.pad_token_id)

    class Stop(Exception):
        pass

    def stop_at_2(rec):
        if rec["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(student(), examples, cfg, tok.pad_token_id, checkpoint_dir=tmp_path, on_step=stop_at_2)
    saved = load_file(str(ckpt.latest_checkpoint(tmp_path) / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # the adapters, not the 4-bit base
    got = train(student(), examples, cfg, tok.pad_token_id, checkpoint_dir=tmp_path, resume=True)
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
