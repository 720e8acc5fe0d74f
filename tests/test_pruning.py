"""Depth pruning: block importance, layer choice, and the pruned model as a normal HF model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from stillhouse import models
from stillhouse.errors import StillhouseError
from stillhouse.train import students

CALIBRATION = [
    "What is 12 + 7? The answer is 19.",
    "Add 3 and 4: 7",
    "The quick brown fox jumps over the lazy dog, twice!",
    "x",
]


def test_cosine_importance_one_finite_score_per_layer(tiny):
    scores = students.cosine_importance(tiny.model, tiny.tokenizer, CALIBRATION)
    assert len(scores) == 4
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert all(0.0 <= s <= 2.0 for s in scores)  # 1 - cos lies in [0, 2]
    assert len(set(scores)) > 1
    assert tiny.tokenizer.padding_side == "left"  # restored after the right-padded calibration batch


def test_cosine_importance_matches_hidden_states_reference(tiny):
    """Reference: 1 - cos(h_i, h_{i+1}) from output_hidden_states, averaged over real tokens."""
    tok = tiny.tokenizer
    scores = students.cosine_importance(tiny.model, tok, CALIBRATION)
    ref = []
    per_text = []
    for text in CALIBRATION:  # one text at a time: no padding at all
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
        per_text.append(hs)
    # hidden_states[i] is block i's input; hidden_states[i + 1] its output, except for the last
    # block, whose output is reported after the final norm: compare the first three blocks.
    for layer in range(3):
        cos = [F.cosine_similarity(hs[layer][0], hs[layer + 1][0], dim=-1) for hs in per_text]
        ref.append(1.0 - torch.cat(cos).mean().item())
    for a, b in zip(scores[:3], ref[:3]):
        assert a == pytest.approx(b, abs=1e-4)


def test_choose_layers_keeps_highest_scores_in_model_order():
    scores = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    assert students.choose_layers(scores, 3) == [0, 2, 4]
    assert students.choose_layers(scores, 1) == [2]
    assert students.choose_layers(scores, 6) == [0, 1, 2, 3, 4, 5]


def test_choose_layers_honours_protect():
    scores = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    assert students.choose_layers(scores, 3, protect=(1,)) == [1, 2, 4]
    assert students.choose_layers(scores, 3, protect=(-1,)) == [2, 4, 5]  # -1 is the last block
    assert students.choose_layers(scores, 2, protect=(1, 5)) == [1, 5]


@pytest.mark.parametrize("keep,protect", [(0, ()), (7, ()), (1, (0, 1))])
def test_choose_layers_rejects_impossible_requests(keep, protect):
    with pytest.raises(StillhouseError):
        students.choose_layers([0.1] * 6, keep, protect)


def test_prune_depth_rejects_bad_selection(tiny):
    for kept in ([], [4], [0, 0], [-1]):
        with pytest.raises(StillhouseError):
            students.prune_depth(tiny.model, kept)


def _ids(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_prune_depth_gives_a_working_smaller_model(tiny, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = students.prune_depth(model, [0, 3])

    # the original is untouched
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    assert len(student.model.layers) == 2
    assert student.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 3)):
        a = student.model.layers[new].state_dict()
        b = model.model.layers[old].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (new, old, k)
        assert student.model.layers[new].self_attn.layer_idx == new
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert student.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # a copy
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    assert models.param_count(student) < models.param_count(model)

    enc = _ids(tok, ["What is 2 + 2?", "Hello there, how are you today?"])
    with torch.no_grad():
        logits = student(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        out = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        out_nocache = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] > enc["input_ids"].shape[1]
    assert torch.equal(out, out_nocache)  # the KV cache is indexed by the new layer numbers

    d = tmp_path / "pruned"
    student.save_pretrained(d)
    tok.save_pretrained(d)
    reloaded = AutoModelForCausalLM.from_pretrained(d)
    reloaded.eval()
    assert reloaded.config.num_hidden_layers == 2
    assert len(reloaded.model.layers) == 2
    with torch.no_grad():
        again = reloaded(**enc).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)
    # and stillhouse's own loader takes it as a plain HF directory
    lm = models.load(str(d))
    assert lm.model.config.num_hidden_layers == 2


def test_prune_depth_keeps_layer_types_consistent(tiny):
    model = tiny.model
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    student = students.prune_depth(model, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]


def _calib_loss(model, enc, labels):
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100).item()


def _right_padded(tok, texts):
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    return enc


@pytest.mark.parametrize("with_prompts", [False, True])
def test_loss_importance_is_loss_rise_without_each_block(tiny, with_prompts):
    """One score per block: calibration loss without that block minus the full model's loss."""
    model, tok = tiny.model, tiny.tokenizer
    layers_before = list(model.model.layers)
    prompt_lengths = [5, 3, 10, 0] if with_prompts else None
    scores = students.loss_importance(model, tok, CALIBRATION, prompt_lengths)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    # the model is restored
    assert list(model.model.layers) == layers_before
    assert model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]

    # reference with explicit pruned copies
    enc = _right_padded(tok, CALIBRATION)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for r, n in enumerate(prompt_lengths or []):
        labels[r, :n] = -100
    base = _calib_loss(model, enc, labels)
    ref = [_calib_loss(students.prune_depth(model, [j for j in range(4) if j != i]), enc, labels) - base for i in range(4)]
    for a, b in zip(scores, ref):
        assert a == pytest.approx(b, abs=1e-4)
    # and the chosen layers are those whose removal hurts most
    kept = students.choose_layers(scores, 2)
    assert kept == sorted(sorted(range(4), key=lambda i: -ref[i])[:2])
