"""The training loop: SFT on teacher text, token-level KD on the teacher's logits, DPO, or
on-policy distillation (train/onpolicy.py).

Read it top to bottom:
1. `plan_batches` fixes every optimizer step's examples up front from the seed (batches of
   similar length, so dynamic padding wastes little); a step number is a data position,
   which is what makes resume exact.
2. Each step's batch is split into micro-batches (`shard`): over the processes of a
   data-parallel run (accelerate: DDP/FSDP/DeepSpeed) and over gradient-accumulation passes.
3. The student's hidden states are computed once per micro-batch and only the positions
   that predict a target token go through the LM head (`selected_logits`); the teacher
   (online, eval mode, no grad) scores exactly those tokens, or a cached top-k row does.
4. Every loss term is a *sum* over target tokens divided by the target tokens of the whole
   step (all micro-batches, all processes), so accumulation and data parallelism give the
   same gradient as one big batch. DPO sums per pair and divides by the step's pairs.
5. Checkpoints (model, optimizer, scheduler, RNG, step) every `checkpoint_every` steps.

What differs between SFT/KD, DPO and on-policy distillation is an objective object
(`Distill`, `DPO`, onpolicy.`OnPolicy`): which items it trains on, how the steps' batches are
planned and materialised (on-policy samples each step's completions from the current student),
its loss terms, what a step is normalised by and what is logged. The loop itself does not
branch on the objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import StillhouseError
from ..progress import progress, status
from ..scoring import selected_logits
from . import checkpoint as ckpt
from . import allocator, compact_weights, fsdp, low_memory, tied_embedding
from .config import LoopSettings
from .losses import LossTerm, SortedProbs, TopK, cross_entropy, mixture, needs_sorted, needs_teacher, terms_from_weights
from .preference import dpo_losses, sequence_logprobs


class TrainConfig(LoopSettings):
    """The loop's settings (train/config.LoopSettings, declared once for the loop and the train
    stage) and what the stage works out before training."""

    # The objective (losses.mixture): term dicts {name, weight, beta, alpha}; None means
    # sft_weight * SFT + kd_weight * forward KL.
    loss_terms: list | None = None
    vocab_size: int | None = None  # compare logits on the tokenizer's real vocabulary (padded heads)

    def terms(self) -> list[LossTerm]:
        if self.loss_terms is None:
            return terms_from_weights(self.sft_weight, self.kd_weight)
        return [LossTerm(**t) for t in self.loss_terms]

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # tokens before the first target token; 0 trains on every token
    # Offline teacher signal: top-k ids / log-probs for each target token (len(input_ids) - n_prompt rows).
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    topk_rest: list[float] | None = None  # probability mass outside the top-k (a logit cache has it)
    # Cross-tokenizer signal (no shared ids): the target rows (0 = the token at n_prompt) where a
    # teacher token starts at the same character, and the teacher's sorted top-k probabilities there.
    sorted_rows: list[int] | None = None
    sorted_top: torch.Tensor | None = None  # [len(sorted_rows), k]
    sorted_rest: torch.Tensor | None = None  # [len(sorted_rows)]
    # On-policy signal (train/onpolicy.py): per target token, the policy-gradient advantage
    # (baseline already subtracted) and the teacher's log-prob of the token.
    advantages: list[float] | None = None
    teacher_logprobs: list[float] | None = None


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def sides(self) -> tuple[Example, Example]:
        n = len(self.prompt_ids)
        return Example(self.prompt_ids + self.chosen_ids, n), Example(self.prompt_ids + self.rejected_ids, n)


def collate(examples: list[Example], pad_id: int):
    """Right-pad to the longest example in the batch; mark positions that predict a target.

    Returns ids, attention mask, the boolean mask of predicting positions, their targets, and
    the cached teacher top-k rows for those positions (row-major, like `hidden[mask]`) or None.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    predict = torch.zeros((len(examples), width), dtype=torch.bool)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        attn[r, :n] = 1
        first = max(e.n_prompt, 1)
        # position p predicts token p + 1
        predict[r, first - 1 : n - 1] = True
        targets[r, first - 1 : n - 1] = ids[r, first:n]
    cached = None
    if all(e.topk_ids is not None for e in examples):
        # row j of an example's cache scores token n_prompt + j; with n_prompt == 0 the
        # first token has no predicting position, so its row is skipped
        def rows(e, table):
            return table[max(e.n_prompt, 1) - e.n_prompt : len(e.input_ids) - e.n_prompt]

        def stack(table, dtype):
            return torch.cat([torch.as_tensor(rows(e, getattr(e, table))).to(dtype) for e in examples])

        rest = stack("topk_rest", torch.float32) if all(e.topk_rest is not None for e in examples) else None
        cached = TopK(stack("topk_ids", torch.long), stack("topk_logprobs", torch.float32), rest)
    return ids, attn, predict, targets[predict], cached


def collate_sorted(examples: list[Example]) -> SortedProbs:
    """The examples' sorted teacher rows, indexed into `collate`'s row-major target positions
    (rows cut off by truncation, or without a predicting position, are dropped)."""
    rows, tops, rests, offset = [], [], [], 0
    for e in examples:
        first = max(e.n_prompt, 1) - e.n_prompt  # with n_prompt == 0 the first token is never predicted
        n = n_targets(e)
        keep = [j for j, r in enumerate(e.sorted_rows) if first <= r < first + n]
        rows += [offset + e.sorted_rows[j] - first for j in keep]
        tops.append(e.sorted_top[keep])
        rests.append(e.sorted_rest[keep])
        offset += n
    return SortedProbs(torch.tensor(rows, dtype=torch.long), torch.cat(tops).float(), torch.cat(rests).float())


def n_targets(e: Example) -> int:
    return max(0, len(e.input_ids) - max(e.n_prompt, 1))


def _length(item) -> int:
    if isinstance(item, PreferencePair):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    return len(item.input_ids)


def length_batches(examples: list, batch_size: int, rng: random.Random) -> list[list]:
    """Batches of similar length (little padding), in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    # sort inside windows of 50 batches so batches stay random across epochs
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: _length(examples[i]))
        batches += [[examples[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def plan_batches(examples: list, cfg: TrainConfig) -> list[list]:
    """Every step's batch for the whole run, a pure function of the examples and the seed."""
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, int(round(per_epoch * cfg.epochs)))
    plan: list[list] = []
    while len(plan) < total:
        plan += list(reversed(length_batches(examples, cfg.batch_size, rng)))
    return plan[:total]


def shard(batch: list, micro: int, world: int, rank: int) -> list[list]:
    """This process's micro-batches of one step's batch.

    The batch is sorted by length and cut into `world * k` contiguous chunks of at most
    `micro` items (k the same on every process, as data parallelism needs); chunk i goes to
    process i % world. A chunk can be empty when the batch is smaller than the world: the
    caller still runs it (with zero weight) so every process takes part in every reduction.
    """
    micro = micro or math.ceil(len(batch) / world)
    k = max(1, math.ceil(len(batch) / (micro * world)))
    n_chunks = world * k
    ordered = sorted(batch, key=_length)
    bounds = [round(i * len(ordered) / n_chunks) for i in range(n_chunks + 1)]
    chunks = [ordered[bounds[i] : bounds[i + 1]] for i in range(n_chunks)]
    return chunks[rank::world]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup_ratio))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress_frac = (step - warm) / max(1, total - warm)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress_frac))


class Scorer(torch.nn.Module):
    """The student as one module whose forward returns logits at selected positions only, so
    a data-parallel wrapper (DDP) sees the whole computation go through its forward."""

    def __init__(self, model, late_head_grad: bool = False):
        super().__init__()
        self.model = model
        self.score = low_memory.selected_logits_late_head_grad if late_head_grad else selected_logits

    def forward(self, input_ids, attention_mask, positions):
        return self.score(self.model, input_ids, attention_mask, positions)

    @property
    def _no_split_modules(self):  # FSDP's transformer-based wrapping reads the layer classes from the root
        return getattr(self.model, "_no_split_modules", None)


def _check_vocab(student, teacher, examples, vocab_size: int | None = None) -> None:
    """A same-tokenizer loss compares distributions index by index: the vocabularies must agree
    (on the first `vocab_size` logits when the stage aligned padded output layers)."""
    vs = student.get_output_embeddings().weight.shape[0]
    if teacher is not None:
        vt = teacher.get_output_embeddings().weight.shape[0]
        if (vt != vs) if vocab_size is None else min(vt, vs) < vocab_size:
            raise StillhouseError(
                f"teacher and student vocabularies differ ({vt} vs {vs} logits): token-level KD needs one "
                "tokenizer; use sequence-level KD (kd_weight: 0) or a cross-tokenizer loss"
            )
    cached = [e.topk_ids for e in examples if getattr(e, "topk_ids", None) is not None and len(e.topk_ids)]
    top = max((int(max(max(r) for r in ids)) for ids in cached), default=-1)
    if top >= vs:
        raise StillhouseError(f"cached teacher signal has token id {top} but the student has only {vs} logits: the cache is from another tokenizer")


def _distill_terms(scorer, teacher, batch: list[Example], pad_id: int, cfg: TrainConfig, device):
    """Summed (not averaged) loss terms of one micro-batch, each term's sum for the log, and
    its shape counts."""
    ids, attn, predict, targets, cached = collate(batch, pad_id)
    ids, attn, predict, targets = ids.to(device), attn.to(device), predict.to(device), targets.to(device)
    n = targets.numel()
    s_logits = scorer(ids, attn, predict)
    if cfg.vocab_size and s_logits.size(-1) > cfg.vocab_size:  # (a slice's backward costs a full zero tensor)
        s_logits = s_logits[:, : cfg.vocab_size]
    terms = cfg.terms()
    signal = None
    if needs_teacher(terms):
        if teacher is not None:  # online: the teacher scores exactly these tokens
            with torch.no_grad():
                signal = selected_logits(teacher, ids, attn, predict)[:, : cfg.vocab_size]
        else:  # offline: top-k log-probs cached with the data or in a logit cache
            signal = TopK(cached.ids.to(device), cached.logprobs.to(device),
                          None if cached.rest is None else cached.rest.to(device))
    ranked = None
    if needs_sorted(terms):  # cross-tokenizer: the teacher's sorted probabilities at aligned rows
        ranked = collate_sorted(batch)
        ranked = SortedProbs(ranked.rows.to(device), ranked.top.to(device), ranked.rest.to(device))
    loss, parts = mixture(terms, s_logits, targets, signal, temperature=cfg.temperature, reduction="sum",
                          sorted_teacher=ranked)
    if "sft" not in parts:  # the SFT term is always logged, so a user sees when one term dwarfs another
        with torch.no_grad():
            parts["sft"] = cross_entropy(s_logits.detach(), targets, reduction="sum").item()
    counts = {"rows": len(batch), "padded": ids.numel(), "positions": n, "tokens": int(attn.sum())}
    return loss, parts, counts


def _pair_logprobs(scorer, pairs: list[PreferencePair], pad_id: int, device):
    """Policy log-prob sums of the chosen and rejected sides, [P] each, in one forward pass."""
    sides = [p.sides()[0] for p in pairs] + [p.sides()[1] for p in pairs]
    ids, attn, predict, targets, _ = collate(sides, pad_id)
    ids, attn, predict, targets = ids.to(device), attn.to(device), predict.to(device), targets.to(device)
    seq = sequence_logprobs(scorer(ids, attn, predict), targets, predict)
    counts = {"rows": len(sides), "padded": ids.numel(), "positions": targets.numel(), "tokens": int(attn.sum())}
    return seq[: len(pairs)], seq[len(pairs) :], counts


def _dpo_terms(scorer, pairs: list[PreferencePair], refs: dict[int, tuple[float, float]], pad_id, cfg, device):
    pc, pr, counts = _pair_logprobs(scorer, pairs, pad_id, device)
    rc = torch.tensor([refs[id(p)][0] for p in pairs], device=device)
    rr = torch.tensor([refs[id(p)][1] for p in pairs], device=device)
    losses, margin = dpo_losses(pc, pr, rc, rr, cfg.dpo_beta)
    return losses.sum(), {"dpo": losses.sum().detach(), "reward_acc": (margin > 0).float().sum(), "margin": margin.sum().detach()}, counts


@torch.no_grad()
def _reference_logprobs(model, pairs: list[PreferencePair], pad_id: int, batch: int, device) -> dict[int, tuple[float, float]]:
    """The frozen reference of DPO: the student's own log-probs before any update."""
    scorer = Scorer(model)
    refs = {}
    with progress("DPO reference log-probs", total=len(pairs)) as advance:
        for s in range(0, len(pairs), batch):
            chunk = pairs[s : s + batch]
            pc, pr, _ = _pair_logprobs(scorer, chunk, pad_id, device)
            refs.update({id(p): (c, r) for p, c, r in zip(chunk, pc.tolist(), pr.tolist())})
            advance(len(chunk))
    return refs


def _clip_gradients(accelerator, model, max_norm: float) -> float:
    """Clip to `max_norm`; returns the norm before clipping. Under plain or DDP training the
    gradients are already identical on every process, so the norm is computed locally and the
    gradients are only rescaled when they exceed the limit (rescaling every step by 1.0 cost
    ~5% of a CPU step); sharded setups (FSDP, DeepSpeed) go through accelerate."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return float(norm)


class Distill:
    """SFT and KD terms (`cfg.terms()`) over `Example`s, normalised by target tokens."""

    name = "distill"
    uses_teacher = True  # an online teacher scores the student's tokens

    def check(self, examples: list, cfg: TrainConfig, teacher) -> None:
        if needs_teacher(cfg.terms()) and teacher is None and any(e.topk_ids is None for e in examples):
            raise ValueError("a KD loss term needs a teacher model or a cached teacher signal on every example")
        if needs_sorted(cfg.terms()) and any(e.sorted_rows is None for e in examples):
            raise ValueError("a uld loss term needs the teacher's sorted probabilities on every example (cross_tokenizer.prepare)")

    def items(self, examples: list, cfg: TrainConfig) -> list:
        items = [replace(e, input_ids=e.input_ids[: cfg.max_length]) for e in examples]
        return [e for e in items if n_targets(e) > 0]

    def prepare(self, student, items: list, pad_id: int, cfg: TrainConfig, device) -> dict:
        return {}

    def plan(self, items: list, cfg: TrainConfig) -> list:
        return plan_batches(items, cfg)

    def batch(self, planned: list, step: int, student, teacher, pad_id: int, cfg: TrainConfig, device) -> list:
        """A step's batch from its plan entry: here the planned examples themselves."""
        return planned

    def units(self, batch: list) -> int:
        """What a step's loss is normalised by: its target tokens."""
        return sum(n_targets(e) for e in batch)

    def terms(self, scorer, mb: list, state: dict, pad_id: int, cfg: TrainConfig, device, teacher):
        return _distill_terms(scorer, teacher, mb, pad_id, cfg, device)

    def logged(self, totals: dict, cfg: TrainConfig) -> tuple[float, dict]:
        """The step's loss and the history fields beside it."""
        terms = cfg.terms()
        loss_value = sum(t.weight * totals.get(t.name, 0.0) for t in terms if t.weight)
        kd = [v for k, v in totals.items() if k != "sft"]
        # "kl" is the KD terms' unweighted sum; each term is also logged as loss/<name>
        return loss_value, {"sft": totals.get("sft", 0.0), "kl": sum(kd), **{f"loss/{k}": v for k, v in totals.items()}}


class DPO:
    """Direct preference optimisation over `PreferencePair`s against the student's own frozen
    log-probs before training; normalised by pairs."""

    name = "dpo"
    uses_teacher = False

    def check(self, examples: list, cfg: TrainConfig, teacher) -> None:
        pass

    def items(self, examples: list, cfg: TrainConfig) -> list:
        return [p for p in examples if p.chosen_ids and p.rejected_ids]

    def prepare(self, student, items: list, pad_id: int, cfg: TrainConfig, device) -> dict:
        return _reference_logprobs(student, items, pad_id, cfg.micro_batch_size or cfg.batch_size, device)

    plan = Distill.plan
    batch = Distill.batch

    def units(self, batch: list) -> int:
        """What a step's loss is normalised by: its pairs."""
        return len(batch)

    def terms(self, scorer, mb: list, state: dict, pad_id: int, cfg: TrainConfig, device, teacher):
        return _dpo_terms(scorer, mb, state, pad_id, cfg, device)

    def logged(self, totals: dict, cfg: TrainConfig) -> tuple[float, dict]:
        loss_value = totals.get("dpo", 0.0)
        return loss_value, {"dpo": loss_value, "reward_acc": totals.get("reward_acc", 0.0), "margin": totals.get("margin", 0.0)}


# The objectives the loop takes (`TrainConfig.objective`).
OBJECTIVES = {o.name: o for o in (Distill(), DPO())}


def objective_of(cfg: TrainConfig):
    if cfg.objective not in OBJECTIVES:
        raise StillhouseError(f"unknown training objective '{cfg.objective}' ({', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.objective]


def accumulate_gradients(scorer, batch: list, cfg: TrainConfig, pad_id: int, accelerator, teacher=None, state=None,
                         objective=None):
    """Forward and backward over this process's micro-batches of one step's `batch`.

    Each micro-batch's loss is its *sum* over target tokens (pairs for DPO) divided by the
    whole step's count, so the accumulated gradient equals one big batch's mean gradient
    whatever the split. Returns the summed log terms and the shapes processed here.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    objective = objective or objective_of(cfg)
    # DDP averages gradients over processes; scaling by `world` turns that into a sum
    scale = world / max(objective.units(batch), 1)
    logs: dict[str, torch.Tensor] = {}
    counts = {"rows": 0, "padded": 0, "positions": 0, "tokens": 0}
    micro = shard(batch, cfg.micro_batch_size, world, rank)
    for i, mb in enumerate(micro):
        weight = scale if mb else 0.0
        mb = mb or batch[:1]  # an empty share still joins the gradient reduction, at weight 0
        # gradients are reduced across processes once per step, after the last micro-batch
        sync = accelerator.no_sync(scorer) if i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            loss, parts, c = objective.terms(scorer, mb, state, pad_id, cfg, device, teacher)
            accelerator.backward(loss * weight)
        if weight:
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v
            counts = {k: counts[k] + c[k] for k in counts}
    return logs, counts


def train(
    student,
    examples: list,
    cfg: TrainConfig,
    pad_id: int,
    teacher=None,
    description: str = "Training",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    metrics_path: str | Path | None = None,
    on_step=None,
    accelerator=None,
    objective=None,
):
    """Train `student` in place. Returns the per-step history (loss, sft, kl, lr, tokens/s, ...).

    `examples` are `Example`s (distill) or `PreferencePair`s (dpo). With `checkpoint_dir` and
    `cfg.checkpoint_every`, checkpoints are written there; `resume=True` continues from the
    latest one. `metrics_path` gets one JSON line per step. `on_step(record)` is called after
    every step (on every process). `objective` overrides `cfg.objective` with an objective
    object (on-policy distillation passes its own, with the examples as `onpolicy.Prompt`s).
    """
    from ..processes import accelerator as default_accelerator

    objective = objective or objective_of(cfg)
    objective.check(examples, cfg, teacher)
    accelerator = accelerator or default_accelerator()
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    items = objective.items(examples, cfg)
    if not items:
        raise StillhouseError("nothing to train on: every example is empty or all prompt")
    _check_vocab(student, teacher if objective.uses_teacher else None, items, cfg.vocab_size)
    if cfg.low_memory:
        low_memory.check(cfg.grad_clip, cfg.batch_size, cfg.micro_batch_size, accelerator.num_processes)
        if teacher is not None and objective.uses_teacher:  # in place; its outputs stay bit-identical
            allocator.return_freed_memory()  # (also set by low_memory.applied) so the encoding's
            compact_weights.compact(teacher)  # temporaries do not stay behind in the heap
            allocator.trim()
    elif cfg.allocator == "reuse":
        allocator.keep_freed_memory()
    elif cfg.allocator != "system":
        raise StillhouseError(f"unknown allocator setting '{cfg.allocator}' (reuse, system)")
    if teacher is not None:
        teacher.eval()
    student.eval()
    state = objective.prepare(student, items, pad_id, cfg, device)  # DPO: the frozen reference log-probs

    plan = objective.plan(items, cfg)
    total = len(plan)
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
    # fused AdamW: one kernel over all parameters; on CPU it is several times faster than the loop
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, total, cfg) / cfg.lr)
    scorer, opt = accelerator.prepare(Scorer(student, late_head_grad=cfg.low_memory), opt)

    start_step, history, sharded = 0, [], fsdp.active(scorer)
    if resume and checkpoint_dir and (last := ckpt.latest_checkpoint(checkpoint_dir)) is not None:
        with status(f"Resuming from {last}"):
            start_step, history = ckpt.load_checkpoint(last, accelerator.unwrap_model(scorer).model, opt, sched,
                                                       fsdp_root=scorer if sharded else None)
    if metrics_path and accelerator.is_main_process:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text("".join(json.dumps(h) + "\n" for h in history))

    student.train()
    tokens_seen = history[-1]["tokens"] if history else 0
    run_tokens, t0 = 0, time.perf_counter()
    saving = low_memory.applied(student, opt) if cfg.low_memory else contextlib.nullcontext()
    # a tied embedding's gradient as the rows the batch used, not a vocabulary-wide copy
    sparse_rows = tied_embedding.sparse_gradient(student, enabled=accelerator.num_processes == 1)
    with saving, sparse_rows, progress(description, total=total) as advance:
        advance(start_step)
        for step in range(start_step, total):
            # on-policy: the student samples this step's completions with the weights it has now
            batch = objective.batch(plan[step], step, student, teacher, pad_id, cfg, device)
            units = objective.units(batch)
            lr = sched.get_last_lr()[0]
            logs, counts = accumulate_gradients(scorer, batch, cfg, pad_id, accelerator, teacher, state, objective)
            grad_norm = _clip_gradients(accelerator, scorer, cfg.grad_clip) if cfg.grad_clip else None
            if not cfg.low_memory:  # otherwise every parameter was stepped in the backward pass
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            # logging: sums over this step's micro-batches on every process, divided by the step's units
            keys = sorted(logs)
            summed = accelerator.reduce(torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device) for k in keys]), "sum") if keys else []
            totals = dict(zip(keys, [float(v) / max(units, 1) for v in summed]))
            step_tokens = int(accelerator.reduce(torch.tensor(counts["tokens"], device=device), "sum"))
            tokens_seen += step_tokens
            run_tokens += step_tokens
            elapsed = time.perf_counter() - t0
            loss_value, extra = objective.logged(totals, cfg)
            rec = {
                "step": step + 1, "loss": loss_value, **extra, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens_seen, "tokens_per_s": run_tokens / max(elapsed, 1e-9),
                # this process's shapes (rows, padded width x rows, LM-head rows): for FLOP counts
                **{k: counts[k] for k in ("rows", "padded", "positions")},
                **({"fsdp": True} if sharded else {}),  # parameters sharded over the processes (train/fsdp.py)
            }
            history.append(rec)
            if metrics_path and accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            done = step + 1
            # the last step is checkpointed too, so a resumed multi-phase run skips finished phases
            if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == total):
                accelerator.wait_for_everyone()
                # FSDP: every process gathers its shards (a collective), the main one writes
                full = (fsdp.full_model_state(student), fsdp.full_optimizer_state(scorer, opt)) if sharded else None
                if accelerator.is_main_process:
                    ckpt.save_checkpoint(checkpoint_dir, done, accelerator.unwrap_model(scorer).model, opt, sched, history,
                                         full_state=full)
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(rec)
            advance(1, info=f"loss {loss_value:.3f} {rec['tokens_per_s']:.0f} tok/s")
    student.eval()
    if sharded:  # the whole student for saving (models.save), gathered on the main process
        student.stillhouse_full_state = fsdp.without_tied(student, fsdp.full_model_state(student))
    return history


