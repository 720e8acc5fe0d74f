"""Scoring token sequences: logits only at the positions that matter.

Shared by training (loss positions) and evaluation (KL to the teacher on held-out text).
Positions are selected *before* the LM head, so full-vocabulary logits are never built for
prompt or padding tokens.
"""

from __future__ import annotations

import torch


def decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final soft-capping the architecture uses) to selected rows."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def selected_logits(model, input_ids, attention_mask, positions) -> torch.Tensor:
    """Logits [N, vocab] at the N True entries of `positions` ([B, L] bool), row-major order."""
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm_logits(model, hidden[positions])


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[r, : len(s)] = 1
    return ids, attn
