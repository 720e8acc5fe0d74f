"""Training curves for experiment trackers, on request: the per-step history the train stage
always writes as `metrics.jsonl` is replayed into TensorBoard event files beside the model.

Replaying after training keeps trackers out of the training loop and makes them optional
(`pip install stillhouse[tracking]`); a recipe asks with `log_to: [tensorboard]`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StillhouseError

SCALARS = ("loss", "sft", "kl", "lr", "tokens_per_s")


def to_tensorboard(history: list[dict], out_dir: Path, run_name: str = "train") -> Path:
    """Write each step's scalars as `train/<name>` (steps numbered across phases); returns the log dir."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise StillhouseError("log_to: tensorboard needs the tensorboard package (pip install stillhouse[tracking])") from None
    log_dir = Path(out_dir) / "tensorboard" / run_name
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for step, h in enumerate(history, 1):
            for key in SCALARS:
                if h.get(key) is not None:
                    writer.add_scalar(f"train/{key}", float(h[key]), step)
    finally:
        writer.close()
    return log_dir


TRACKERS = {"tensorboard": to_tensorboard}


def export_history(history: list[dict], out_dir: Path, trackers: list[str], run_name: str = "train") -> None:
    for name in trackers:
        TRACKERS[name](history, out_dir, run_name)
