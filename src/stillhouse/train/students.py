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


# -- width pruning (Minitron-style: activation importance on calibration text) ---------------
def _attn_geometry(model) -> tuple[int, int, int]:
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


@torch.inference_mode()
def width_importance(model, tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per decoder block: `mlp`, the mean |activation| of each MLP channel (the input of
    down_proj), and `kv_groups`, the summed mean L2 norm of the attention heads' outputs (the
    input of o_proj) over each key/value group, both over the real tokens of the calibration text."""
    layers = decoder_layers(model)
    heads, kv, head_dim = _attn_geometry(model)
    enc = _calibration_batch(tokenizer, texts)
    mask = enc["attention_mask"].bool()
    found: list[dict[str, torch.Tensor]] = [{} for _ in layers]

    def hook(i, key):
        def fn(module, args):
            x = args[0][mask].float()  # [tokens, features]
            if key == "mlp":
                found[i][key] = x.abs().mean(0)
            else:
                per_head = x.view(x.size(0), heads, head_dim).norm(dim=-1).mean(0)  # [heads]
                found[i][key] = per_head.view(kv, heads // kv).sum(-1)

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(i, "mlp")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(i, "kv_groups")))
    try:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


def _sliced(linear: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return out


def prune_width(model, importance: list[dict[str, torch.Tensor]], mlp_channels: int | None = None, kv_heads: int | None = None):
    """A copy keeping, in every block, the `mlp_channels` most important MLP channels and the
    `kv_heads` most important key/value groups (each with its query heads). The counts are the
    same in every block so the result is a normal HF config; it saves and loads as one."""
    heads, kv, head_dim = _attn_geometry(model)
    inter = model.config.intermediate_size
    if mlp_channels is not None and not 1 <= mlp_channels <= inter:
        raise StillhouseError(f"mlp_channels must be between 1 and the model's {inter}, not {mlp_channels}")
    if kv_heads is not None and not 1 <= kv_heads <= kv:
        raise StillhouseError(f"kv_heads must be between 1 and the model's {kv} key/value heads, not {kv_heads}")
    student = copy.deepcopy(model)
    rep = heads // kv
    for layer, imp in zip(decoder_layers(student), importance):
        if mlp_channels is not None:
            keep = imp["mlp"].topk(mlp_channels).indices.sort().values
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=keep), _sliced(mlp.up_proj, rows=keep)
            mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
        if kv_heads is not None:
            groups = imp["kv_groups"].topk(kv_heads).indices.sort().values.tolist()
            kv_idx = torch.tensor([g * head_dim + d for g in groups for d in range(head_dim)])
            q_idx = torch.tensor([(g * rep + r) * head_dim + d for g in groups for r in range(rep) for d in range(head_dim)])
            attn = layer.self_attn
            attn.q_proj, attn.o_proj = _sliced(attn.q_proj, rows=q_idx), _sliced(attn.o_proj, cols=q_idx)
            attn.k_proj, attn.v_proj = _sliced(attn.k_proj, rows=kv_idx), _sliced(attn.v_proj, rows=kv_idx)
    cfg = student.config
    if mlp_channels is not None:
        cfg.intermediate_size = mlp_channels
    if kv_heads is not None:
        cfg.head_dim = head_dim  # no longer hidden_size / heads
        cfg.num_attention_heads, cfg.num_key_value_heads = kv_heads * rep, kv_heads
    return student


# -- scratch students ---------------------------------------------------------------------------
def scratch(teacher_config, layers: int, hidden_size: int, heads: int, kv_heads: int | None = None,
            intermediate_size: int | None = None, seed: int = 0):
    """A randomly initialised model of the teacher's architecture and vocabulary (so it uses the
    teacher's tokenizer) with the given depth and width."""
    from transformers import AutoModelForCausalLM

    kv_heads = kv_heads or heads
    if hidden_size % heads or heads % kv_heads:
        raise StillhouseError(f"hidden_size ({hidden_size}) must divide by heads ({heads}), and heads by kv_heads ({kv_heads})")
    d = teacher_config.to_dict()
    d.pop("layer_types", None)  # recomputed for the new depth (e.g. Gemma's sliding/global pattern)
    ratio = teacher_config.intermediate_size / teacher_config.hidden_size
    d.update(num_hidden_layers=layers, hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=kv_heads,
             head_dim=hidden_size // heads, intermediate_size=intermediate_size or int(round(ratio * hidden_size)))
    cfg = type(teacher_config)(**d)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)
