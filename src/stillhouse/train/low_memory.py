"""Low-memory training (`low_memory: true`): four measures that lower peak memory on one machine,
on top of the sparse tied-embedding gradient every single-process run gets (tied_embedding.py).

1. The optimizer steps each parameter inside the backward pass, the moment its gradient is
   complete, and frees that gradient; the full set of gradients (4 bytes per parameter)
   never exists. The price: no global-norm clipping (it needs every gradient at once), one
   micro-batch per step, one process.
2. glibc's allocator is told to serve blocks over 256 KiB with their own mappings and to
   return freed memory promptly (`allocator.return_freed_memory`), instead of keeping a
   step's large blocks for the next one as the default loop does. The cost is page faults
   on fresh blocks: bench/train.py measures both sides.
3. The LM head's weight gradient ([vocab, hidden], 113 MB on SmolLM2) is computed at the end
   of the backward pass instead of at its start (`selected_logits_late_head_grad`), so it no
   longer coexists with every layer's saved activations; the gradient is the same product.
4. An online teacher converted from a GGUF keeps its weights as block codes
   (compact_weights.py); its logits do not change.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import StillhouseError
from ..scoring import decoder, selected_logits
from .allocator import return_freed_memory
from .config import low_memory_problem as problem


def check(grad_clip: float, batch_size: int, micro_batch_size: int, world: int) -> None:
    if why := problem(grad_clip, batch_size, micro_batch_size, world):
        raise StillhouseError(f"low_memory: {why}")


@contextlib.contextmanager
def applied(model: torch.nn.Module, optimizer):
    """Both measures for the duration of a training run; the hooks are removed on the way
    out, also when the run fails."""
    hooks = step_in_backward(model, optimizer)
    return_freed_memory()
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def step_in_backward(model: torch.nn.Module, optimizer) -> list:
    """Apply `optimizer` to each parameter the moment its gradient is complete, then free it.

    Every other gradient is None at that moment (applied and freed already, or not computed
    yet), so `optimizer.step()` moves this one parameter, with the optimizer's own update rule,
    parameter groups, learning rate and state: schedulers and checkpoints work unchanged. A
    tied parameter fires once, after both of its contributions are summed. Returns the hook
    handles (remove them when training ends)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper adds sync checks

    def hook(p):
        inner.step()
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]


class _HeadInputGrad(torch.autograd.Function):
    """logits = h W^T whose backward returns h's gradient only and leaves (grad_logits, h) in
    `holder` for `_HeadWeightGrad`."""

    @staticmethod
    def forward(ctx, h, weight, holder):
        ctx.save_for_backward(h, weight)
        ctx.holder = holder
        return h @ weight.t()

    @staticmethod
    def backward(ctx, grad_logits):
        h, weight = ctx.saved_tensors
        ctx.holder["grad_logits"], ctx.holder["h"] = grad_logits, h
        return grad_logits @ weight, None, None


class _HeadWeightGrad(torch.autograd.Function):
    """The identity on the decoder's input embeddings; its backward, which autograd reaches
    after every decoder layer's, adds the LM head's weight gradient grad_logits^T h."""

    @staticmethod
    def forward(ctx, x, weight, holder):
        ctx.holder = holder
        return x.clone()

    @staticmethod
    def backward(ctx, grad_x):
        grad_logits, h = ctx.holder.pop("grad_logits", None), ctx.holder.pop("h", None)
        grad_w = None if grad_logits is None else grad_logits.t() @ h
        return grad_x, grad_w, None


def selected_logits_late_head_grad(model, input_ids, attention_mask, positions):
    """scoring.selected_logits with the LM head's weight gradient computed last (measure 3);
    plain selected_logits where that does not apply (a frozen or biased head, a soft cap)."""
    head = model.get_output_embeddings()
    if (type(head) is not torch.nn.Linear or head.bias is not None or not head.weight.requires_grad
            or not torch.is_grad_enabled() or getattr(model.config, "final_logit_softcapping", None)):
        return selected_logits(model, input_ids, attention_mask, positions)
    holder: dict = {}
    x = _HeadWeightGrad.apply(model.get_input_embeddings()(input_ids), head.weight, holder)
    hidden = decoder(model)(inputs_embeds=x, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return _HeadInputGrad.apply(hidden[positions], head.weight, holder)
