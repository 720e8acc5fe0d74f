"""LoRA adapters through peft: wrap a student before training, merge (or not) before saving.

QLoRA: the student is loaded with 4-bit linear weights (bitsandbytes, `models.load(...,
quantize="nf4")`) and only the adapters train. Merging folds the adapters into the
*full-precision* base, reloaded for the purpose, so the saved model is a plain HF model
without the 4-bit rounding (as the QLoRA paper merges into the 16-bit base).
"""

from __future__ import annotations

import copy
from typing import Callable

from ..errors import StillhouseError


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str = "all-linear",
             seed: int = 0):
    """The model wrapped with LoRA adapters; only the adapters are trainable. A 4-bit model
    (QLoRA) is first prepared by peft (frozen, norms in full precision). The adapters'
    random initialisation comes from `seed`, so a rerun starts from the same weights."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise StillhouseError("LoRA needs peft: pip install peft") from None
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, cfg)


def finish_lora(model, merge: bool, full_precision_base: Callable[[], object] | None = None):
    """For saving: the plain model with the adapters folded into its weights (`merge`), or the
    peft model as is (its save_pretrained writes the adapter alone). A QLoRA model merges into
    `full_precision_base()`, the same base loaded without quantisation."""
    if not merge:
        return model
    if full_precision_base is None:
        return model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = get_peft_model_state_dict(model)
    plain = get_peft_model(full_precision_base(), copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(plain, adapters)
    return plain.merge_and_unload()


def _numel(p) -> int:
    state = getattr(p, "quant_state", None)  # a 4-bit weight packs two values per stored byte
    return state.shape.numel() if state is not None else p.numel()


def trainable_share(model) -> float:
    total = sum(_numel(p) for p in model.parameters())
    return sum(_numel(p) for p in model.parameters() if p.requires_grad) / max(total, 1)
