"""LoRA adapters through peft: wrap a student before training, merge (or not) before saving.

QLoRA (4-bit base weights through bitsandbytes) needs a CUDA GPU; on CPU it is not offered.
"""

from __future__ import annotations

from ..errors import StillhouseError


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str = "all-linear"):
    """The model wrapped with LoRA adapters; only the adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StillhouseError("LoRA needs peft: pip install 'stillhouse[lora]'") from None
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def finish_lora(model, merge: bool):
    """For saving: the plain model with the adapters folded into its weights (`merge`), or the
    peft model as is (its save_pretrained writes the adapter alone)."""
    return model.merge_and_unload() if merge else model


def trainable_share(model) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
