"""A recipe under a multi-process launcher (torchrun, `accelerate launch`): who runs what.

Every process runs the same recipe, stage by stage, and they agree on each stage through the
main process:
- a stage type registered `parallel` (stages.py: those that train through the shared loop,
  whose Accelerator expects every process in each step) runs on every process (data parallel
  through accelerate, each process training its share of every batch); only the main process
  writes the artifact, the others write into a scratch directory that is thrown away;
- every other stage (data engine, pruning, scoring, evaluation) runs on the main process
  alone while the others wait, then read its artifact. Two processes sampling the same
  teacher would only duplicate work and race on the same files.

Waiting goes through a gloo group of its own with a timeout of days: a data-engine stage can
run for hours, far longer than a collective's default timeout. The workspace must be one
directory that every process sees (on several nodes: a shared file system).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

_WAIT = timedelta(days=7)


def launched_world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this is the launcher's rank 0 (or there is no launcher): the one that owns the
    workspace's shared files (checkpoints, artifacts)."""
    return os.environ.get("RANK", "0") in ("", "0")


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    _group: object = None  # the gloo group the processes wait on

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def from_main(self, value):
        """The main process's `value`, on every process (every process must call this)."""
        if not self.many:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def close(self) -> None:
        """Leave the process groups once every process is done (call it on every process after
        the last stage). Gloo's worker threads left running when the interpreter exits can abort
        the process ("terminate called without an active exception", SIGABRT; pytorch/pytorch
        issue 190489): a launched run whose work had all succeeded then failed in CI. The
        barrier first, so that no process leaves while another still waits on a collective."""
        if not self.many:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier(group=self._group)
            dist.destroy_process_group()  # the default group and every group made from it


def _cpu_only() -> bool:
    """Whether accelerate must be told `cpu=True`: without it, a launched run on a machine
    with no CUDA device stays single-process in every process (each trains the whole batch)."""
    import torch

    return launched_world_size() > 1 and not torch.cuda.is_available()


def accelerator():
    """The Accelerator a training loop uses when its caller gives none."""
    from accelerate import Accelerator

    from .train import fsdp

    acc = Accelerator(cpu=_cpu_only())
    if fsdp.requested():  # accelerate turns FSDP on for GPUs only; on CPU (gloo) stillhouse does
        fsdp.enable_on_cpu(acc)
    return acc


def from_environment() -> Processes:
    """The processes of this run. Under a launcher this joins the default process group
    (accelerate's PartialState, which the training loop's Accelerator then reuses) and opens
    the long-timeout group for waiting."""
    if launched_world_size() == 1:
        return Processes()
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    if state.num_processes == 1:
        return Processes()
    return Processes(state.process_index, state.num_processes, dist.new_group(backend="gloo", timeout=_WAIT))
