"""A tied input embedding's gradient, kept sparse.

When the input embedding and the LM head are one matrix, its gradient has two parts: the
LM head's, dense over the whole vocabulary, and the embedding's, non-zero only on the rows
the batch looks up. By default PyTorch builds the embedding's part as a second dense
[vocab, hidden] tensor (zero-filled, then scattered into) and adds it to the head's: on
SmolLM2 (49k x 576) that is a quarter of a CPU training step and 0.15 GB of peak memory for
a few hundred non-zero rows. Asked for a sparse gradient instead, the embedding hands over
only those rows, and autograd adds them into the head's dense gradient, so the parameter's
final gradient is the same dense tensor (equal up to summation order) and the optimizer,
clipping and checkpoints see nothing different.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def sparse_gradient(model: torch.nn.Module, enabled: bool = True):
    """Within the block, a tied and trainable input embedding produces sparse gradients.

    An untied embedding is left alone: its gradient would stay sparse, which AdamW refuses.
    Not for data-parallel or sharded runs (`enabled=False`): their gradient hooks expect dense
    gradients on every contribution."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and emb is not None and emb.weight is head.weight
    if not (enabled and tied and emb.weight.requires_grad and isinstance(emb, torch.nn.Embedding)) or emb.sparse:
        yield
        return
    emb.sparse = True
    try:
        yield
    finally:
        emb.sparse = False
