"""FSDP (accelerate's FSDP2 plugin): the whole student for saving, and checkpoints that resume.

Under FSDP every process holds a shard of each parameter (a DTensor) and of the optimizer
state, so the loop's plain paths (`unwrap_model(...).state_dict()`, `optimizer.state_dict()`)
would see one shard. Here both are gathered into full, unsharded state dicts (torch's
`torch.distributed.checkpoint.state_dict` helpers, `full_state_dict=True`): a collective, so
every process calls it; the tensors land on the CPU of the main process only. Resuming loads
the full state dicts from the checkpoint on every process (the workspace is shared, see
docs/distributed.md) and each keeps its own shard.

accelerate enables FSDP only for accelerator devices. `enable_on_cpu` turns it on for a
multi-process CPU run (gloo) when the launch asks for FSDP (`ACCELERATE_USE_FSDP=true`, as
`accelerate launch --config_file examples/accelerate/fsdp.yaml` sets): that is how the tests
run FSDP on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch


def requested() -> bool:
    """Whether the launch asked for FSDP (accelerate's own environment flag)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_on_cpu(accelerator) -> None:
    """Switch a multi-process CPU accelerator to FSDP2 with the plugin the environment
    describes (FSDP_* variables; FULL_STATE_DICT, a unit per decoder layer by default here)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    os.environ.setdefault("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")  # each decoder layer a unit
    os.environ.setdefault("FSDP_VERSION", "2")
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def active(model: torch.nn.Module) -> bool:
    """Whether `model` (as `accelerator.prepare` returned it) is sharded by FSDP. Asked of the
    model, not the accelerator: accelerate's state reads MULTI_CPU again after a CPU prepare."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's tensors on the main process's CPU ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(root: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name ({} off the main process). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(root, _inner(optimizer), options=_options(cpu_offload=True))


def load_full_state(root: torch.nn.Module, model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every process loads the full state dicts and keeps its shard. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(root, _inner(optimizer), optimizer_state, options=_options())


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def unique(state: dict) -> dict:
    """A state dict safetensors can write: tensors that share storage (tied embeddings) copied."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    return out


def without_tied(model: torch.nn.Module, state: dict) -> dict:
    """The state dict without the second name of a tied parameter (e.g. `lm_head.weight` tied to
    the embedding), as `save_pretrained` writes a model it holds itself."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
    return {k: v for k, v in state.items() if k not in tied}
