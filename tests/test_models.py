"""stillhouse.models: specs -> (model, tokenizer, identity)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from stillhouse import models
from stillhouse.errors import StillhouseError

from conftest import SMOLLM, state_fingerprint


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_hf_dir_returns_model_tokenizer_identity(tiny_model_dir):
    lm = models.load(str(tiny_model_dir))
    assert isinstance(lm.model, torch.nn.Module)
    assert lm.model.config.num_hidden_layers == 4
    assert lm.tokenizer.eos_token == "<|im_end|>"
    assert lm.tokenizer.padding_side == "left"  # batched generation needs left padding
    ident = lm.identity
    assert ident.source == "hf-dir"
    assert ident.weights_sha256 == _sha256(tiny_model_dir / "model.safetensors")
    assert ident.license == "unknown"
    assert ident.spec == str(tiny_model_dir.resolve())
    assert not lm.model.training


def test_load_reads_license_from_model_card(tiny_model_dir, tmp_path):
    d = tmp_path / "carded"
    shutil.copytree(tiny_model_dir, d)
    (d / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n\n# tiny\n")
    lm = models.load(str(d))
    assert lm.identity.license == "mit"
    assert lm.identity.source == "hf-dir"
    # same bytes, same hash, wherever the directory lives
    assert lm.identity.weights_sha256 == _sha256(tiny_model_dir / "model.safetensors")


def test_weights_hash_changes_with_weights(tiny_model_dir, tmp_path):
    d = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, d)
    lm = models.load(str(d))
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[0, 0] += 1.0
    lm.model.save_pretrained(d)
    assert models.weights_hash(d) != _sha256(tiny_model_dir / "model.safetensors")
    assert models.weights_hash(d) == _sha256(d / "model.safetensors")


@pytest.mark.parametrize("spec", ["./nope", "/nope/x.gguf", "./missing/model.gguf"])
def test_missing_path_raises_naming_it(spec):
    with pytest.raises(StillhouseError) as ei:
        models.load(spec)
    assert spec in str(ei.value)


def test_directory_without_config_raises(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    with pytest.raises(StillhouseError, match="config.json"):
        models.load(str(d))


def test_unknown_bare_name_raises():
    with pytest.raises(StillhouseError) as ei:
        models.load("definitely-not-a-model")
    msg = str(ei.value)
    assert "definitely-not-a-model" in msg
    assert "smollm2-135m-instruct" in msg  # lists the built-ins


def test_param_count_counts_tied_weights_once(tiny):
    model = tiny.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    all_named = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    unique = sum(p.numel() for p in set(model.parameters()))
    emb = model.get_input_embeddings().weight.numel()
    assert models.param_count(model) == unique
    assert all_named == unique + emb  # the tied LM head shares the embedding matrix
    # against an architectural count: embeddings + 4 * (attn + mlp + 2 norms) + final norm
    h, i, kv = 32, 64, 2 * 8  # 2 kv heads of head_dim 8
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h
    assert models.param_count(model) == emb + 4 * per_layer + h


def test_param_count_untied_counts_both():
    a = torch.nn.Linear(4, 3, bias=False)
    b = torch.nn.Linear(4, 3, bias=False)
    both = torch.nn.ModuleList([a, b])
    assert models.param_count(both) == 24
    b.weight = a.weight
    assert models.param_count(both) == 12


@pytest.mark.slow
def test_builtin_smollm2_converts_once_and_reloads_from_cache(smollm_cache, monkeypatch):
    info = smollm_cache
    assert not info["converted_before"]
    assert info["layers"] == 30
    ident = info["identity"]
    assert ident.license == "Apache-2.0"
    assert ident.source == "builtin"
    assert ident.spec == SMOLLM
    conv = info["cache"] / "converted"
    dirs = [d for d in conv.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == 1
    assert (dirs[0] / "model.safetensors").is_file()
    assert (dirs[0] / "config.json").is_file()
    assert not list(conv.glob(".*partial*"))

    # the second load reads the converted safetensors: no GGUF conversion runs again
    monkeypatch.setattr(models, "convert_gguf", _no_conversion)
    lm = models.load(SMOLLM)
    assert lm.model.config.num_hidden_layers == 30
    assert lm.identity == ident
    assert state_fingerprint(lm.model) == info["fingerprint"]


def _no_conversion(*a, **k):
    raise AssertionError("the GGUF was converted again instead of read from the cache")


@pytest.mark.slow
def test_builtin_gemma3_assembles_converts_and_needs_its_bos(tmp_path, monkeypatch):
    """gemma3-270m: the four chunk packages are joined (sha256-checked), converted once, and
    raw prompts to this base model get its BOS (without it Gemma degenerates)."""
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path))
    from stillhouse.teachers.base import SamplingParams
    from stillhouse.teachers.hf import HFTeacher, encode_prompt

    lm = models.load("gemma3-270m")
    assert lm.identity.license == "gemma-terms-of-use"
    assert lm.identity.weights_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert lm.model.config.num_hidden_layers == 18
    assert (tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf").is_file()
    ids = encode_prompt(lm.tokenizer, "The capital of France is")
    assert ids[0] == lm.tokenizer.bos_token_id
    out = HFTeacher(lm.model, lm.tokenizer).generate_text(["The capital of France is"], SamplingParams(max_new_tokens=8))
    words = out[0][0].text.split()
    assert len(words) >= 3 and len(set(words)) > 2, out[0][0].text  # not a repeated-token collapse
    monkeypatch.setattr(models, "convert_gguf", _no_conversion)  # reloads come from the cache
    again = models.load("gemma3-270m")
    assert again.identity == lm.identity
