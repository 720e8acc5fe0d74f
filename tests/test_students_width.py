"""Width pruning (MLP channels, key/value head groups), scratch students, LoRA."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM

from stillhouse.errors import StillhouseError
from stillhouse.train import students

TEXTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>", "Add 10 and 25: 35.", "hello there, friend"]


def _logits(model, tok, text="What is 2 + 9? It is 11."):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_width_importance_shapes_and_ranks_a_silenced_channel_last(tiny):
    model, tok = tiny.model, tiny.tokenizer
    layer = students.decoder_layers(model)[1]
    with torch.no_grad():
        layer.mlp.up_proj.weight[5].zero_()  # channel 5 of block 1 now always outputs 0
        layer.self_attn.v_proj.weight[:8].zero_()  # kv group 0 of block 1 (head_dim 8) outputs 0
    imp = students.width_importance(model, tok, TEXTS)
    assert len(imp) == model.config.num_hidden_layers
    assert imp[1]["mlp"].shape == (model.config.intermediate_size,)
    assert imp[1]["kv_groups"].shape == (model.config.num_key_value_heads,)
    assert imp[1]["mlp"].argmin().item() == 5 and imp[1]["mlp"][5].item() == 0.0
    assert imp[1]["kv_groups"].argmin().item() == 0 and imp[1]["kv_groups"][0].item() == pytest.approx(0.0, abs=1e-6)


def test_pruning_only_dead_width_keeps_the_outputs(tiny):
    """Channels and heads that contribute nothing can go without changing a single logit."""
    model, tok = tiny.model, tiny.tokenizer
    with torch.no_grad():
        for layer in students.decoder_layers(model):
            layer.mlp.up_proj.weight[40:].zero_()  # channels 40..63 always output 0
            layer.self_attn.v_proj.weight[8:].zero_()  # kv group 1 (query heads 2, 3) outputs 0
    imp = students.width_importance(model, tok, TEXTS)
    pruned = students.prune_width(model, imp, mlp_channels=40, kv_heads=1)
    assert pruned.config.intermediate_size == 40 and pruned.config.num_key_value_heads == 1
    assert pruned.config.num_attention_heads == 2 and pruned.config.head_dim == 8
    assert students.decoder_layers(pruned)[0].mlp.gate_proj.weight.shape == (40, 32)
    torch.testing.assert_close(_logits(pruned, tok), _logits(model, tok), rtol=1e-4, atol=1e-5)
    assert model.config.intermediate_size == 64  # the original is untouched


def test_width_pruned_model_saves_and_loads_with_plain_transformers(tiny, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    pruned = students.prune_width(model, students.width_importance(model, tok, TEXTS), mlp_channels=24, kv_heads=1)
    pruned.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(again, tok), _logits(pruned, tok))
    # and it trains: a loss goes down through the pruned shapes
    ids = torch.tensor([tok("1 2 3 4 5 6 7 8", add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = again(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_width_pruning_rejects_impossible_counts(tiny):
    imp = students.width_importance(tiny.model, tiny.tokenizer, TEXTS)
    with pytest.raises(StillhouseError, match="mlp_channels"):
        students.prune_width(tiny.model, imp, mlp_channels=65)
    with pytest.raises(StillhouseError, match="kv_heads"):
        students.prune_width(tiny.model, imp, kv_heads=3)


def test_scratch_student_has_the_teachers_vocabulary_and_the_asked_shape(tiny, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    s = students.scratch(model.config, layers=2, hidden_size=16, heads=2, kv_heads=1, seed=1)
    assert s.config.num_hidden_layers == 2 and s.config.hidden_size == 16 and s.config.intermediate_size == 32
    assert s.get_output_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0]
    assert s.config.model_type == model.config.model_type
    s.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again, tok), _logits(s, tok))
    # seeded: the same call gives the same weights
    s2 = students.scratch(model.config, layers=2, hidden_size=16, heads=2, kv_heads=1, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), s2.state_dict().values()))
    with pytest.raises(StillhouseError, match="must divide"):
        students.scratch(model.config, layers=2, hidden_size=18, heads=4)
