"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a directory `step-00000042/` holding the model weights (safetensors), and
`state.pt` with the optimizer and scheduler states, the Python and torch RNG states, the
step reached (the data position: the batch plan is a pure function of the seed, so the
step number says where in it to continue) and the history so far. It is written under a
temporary name and renamed into place, so a `kill -9` mid-write leaves the previous
checkpoint intact; older checkpoints are removed only after the new one is complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import StillhouseError
from ..fsutil import atomic_dir
from . import fsdp

PREFIX = "step-"


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, history: list[dict], keep: int = 1,
                    full_state: tuple[dict, dict] | None = None) -> Path:
    """`full_state`: (model, optimizer) state dicts gathered from FSDP shards (train/fsdp.py),
    written instead of the model's and optimizer's own (which hold one shard)."""
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    with atomic_dir(final) as tmp:
        trained = _trained(model)
        if full_state is not None:
            save_file(fsdp.unique(full_state[0]), str(tmp / "model.safetensors"))
        elif trained is None:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        else:
            save_file({n: p.detach().contiguous() for n, p in trained.items()}, str(tmp / "model.safetensors"))
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict() if full_state is None else full_state[1],
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "history": history,
            },
            tmp / "state.pt",
        )
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trained(model) -> dict | None:
    """The trainable parameters when part of the model is frozen (LoRA, QLoRA): the rest is the
    base the run starts from, loaded again on resume, and a 4-bit base does not round-trip
    through a state dict. None when everything trains: the whole model is saved."""
    named = dict(model.named_parameters())
    if all(p.requires_grad for p in named.values()):
        return None
    return {n: p for n, p in named.items() if p.requires_grad}


def _restore(model, path: Path) -> tuple[list[str], list[str]]:
    """Load a checkpoint's weights in place; returns (missing, unexpected) tensor names."""
    trained = _trained(model)
    if trained is None:
        return load_model(model, str(path), strict=False)
    tensors = load_file(str(path))
    with torch.no_grad():
        for name in set(tensors) & set(trained):
            trained[name].copy_(tensors[name])
    return sorted(set(trained) - set(tensors)), sorted(set(tensors) - set(trained))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.partial` directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.pt").is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, fsdp_root=None) -> tuple[int, list[dict]]:
    """Restore model, optimizer, scheduler and RNG states in place; returns (step, history).
    `fsdp_root`: the FSDP-prepared module holding `model`; then every process loads the full
    state dicts and keeps its shard (a collective)."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        if fsdp_root is not None:
            fsdp.load_full_state(fsdp_root, model, optimizer, load_file(str(path / "model.safetensors")), state["optimizer"])
            missing = unexpected = []
        else:
            missing, unexpected = _restore(model, path / "model.safetensors")
    except Exception as e:  # a checkpoint from another model or a damaged file
        raise StillhouseError(f"cannot resume from {path}: {e}") from None
    if missing or unexpected:
        raise StillhouseError(f"cannot resume from {path}: it was written for another model ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    if fsdp_root is None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["history"]
