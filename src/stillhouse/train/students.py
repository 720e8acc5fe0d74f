"""Students: depth-pruned copies of the teacher, layers chosen by measured importance.

Block importance (ShortGPT-style) is 1 - cos(input, output) of each decoder block, averaged
over the real tokens of a calibration batch: a block that barely rotates the hidden state
can go. `loss` importance instead measures how much the calibration loss on the answer
tokens rises when each block alone is removed (one forward pass per block).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import StillhouseError
from ..progress import progress
from ..scoring import selected_logits
from ..teachers.hf import encode_batch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (llama, gemma, qwen, mistral families)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise StillhouseError(f"cannot find decoder layers on {type(model).__name__}; depth pruning needs model.model.layers")
    return layers


def _calibration_batch(tokenizer, texts: list[str], max_length: int = 256):
    tokenizer.padding_side = "right"
    enc = encode_batch(tokenizer, texts, truncation=True, max_length=max_length)
    tokenizer.padding_side = "left"
    return enc


@torch.inference_mode()
def cosine_importance(model, tokenizer, texts: list[str]) -> list[float]:
    """1 - mean cos(block input, block output) per decoder block, over non-padding tokens."""
    layers = decoder_layers(model)
    enc = _calibration_batch(tokenizer, texts)
    mask = enc["attention_mask"].bool()
    scores = [0.0] * len(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in[mask].float(), h_out[mask].float(), dim=-1)
            captured[i] = 1.0 - cos.mean()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(layers)):
        scores[i] = float(captured[i])
    return scores


@torch.inference_mode()
def _calibration_loss(model, enc, labels) -> float:
    """Mean next-token cross-entropy over labelled tokens; only their predicting positions
    go through the LM head."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    logits = selected_logits(model, enc["input_ids"], enc["attention_mask"], positions)
    return float(F.cross_entropy(logits.float(), labels[:, 1:][labels[:, 1:] != -100]))


def loss_importance(model, tokenizer, texts: list[str], prompt_lengths: list[int] | None = None) -> list[float]:
    """Per block: how much the calibration loss rises when that block alone is removed.

    The loss counts only tokens after `prompt_lengths[i]` (the answer) when given, so blocks
    are judged by what they do for the task, not for the shared chat template.
    """
    layers = decoder_layers(model)
    enc = _calibration_batch(tokenizer, texts)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    if prompt_lengths is not None:
        for r, n in enumerate(prompt_lengths):
            labels[r, :n] = -100
    original = list(layers)
    scores = []
    try:
        base = _calibration_loss(model, enc, labels)
        with progress("Block importance by calibration loss", total=len(original)) as advance:
            for i in range(len(original)):
                _set_layers(model, original[:i] + original[i + 1 :])
                scores.append(_calibration_loss(model, enc, labels) - base)
                advance(1)
    finally:
        _set_layers(model, original)
    return scores


def _set_layers(model, layer_list) -> None:
    model.model.layers = torch.nn.ModuleList(layer_list)
    for new_idx, layer in enumerate(layer_list):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(layer_list)


def choose_layers(scores: list[float], keep: int, protect: tuple[int, ...] = ()) -> list[int]:
    """Indices of the `keep` most important blocks (highest score), in model order."""
    n = len(scores)
    if not 1 <= keep <= n:
        raise StillhouseError(f"cannot keep {keep} of {n} layers")
    protected = {p % n for p in protect}
    if len(protected) > keep:
        raise StillhouseError(f"protect lists {len(protected)} layers but keep is {keep}")
    rest = sorted((i for i in range(n) if i not in protected), key=lambda i: -scores[i])
    return sorted(protected | set(rest[: keep - len(protected)]))


def prune_depth(model, kept: list[int]):
    """A new model holding only the blocks in `kept` (deep-copied); saves as a normal HF model."""
    layers = decoder_layers(model)
    n = len(layers)
    if not kept or any(not 0 <= i < n for i in kept) or len(set(kept)) != len(kept):
        raise StillhouseError(f"invalid layer selection {kept} for a {n}-layer model")
    student = copy.deepcopy(model)
    _set_layers(student, [student.model.layers[i] for i in sorted(kept)])
    cfg = student.config
    if getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[i] for i in sorted(kept)]
    return student
