"""Low-memory training (`low_memory: true`): two measures that lower peak memory on one machine,
on top of the sparse tied-embedding gradient every single-process run gets (tied_embedding.py).

1. The optimizer steps each parameter inside the backward pass, the moment its gradient is
   complete, and frees that gradient; the full set of gradients (4 bytes per parameter)
   never exists. The price: no global-norm clipping (it needs every gradient at once), one
   micro-batch per step, one process.
2. glibc's allocator is told to serve blocks over 256 KiB with their own mappings and to
   return freed memory promptly (`allocator.return_freed_memory`), instead of keeping a
   step's large blocks for the next one as the default loop does. The cost is page faults
   on fresh blocks: bench/train.py measures both sides.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import StillhouseError
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
