"""Recipe fields of the model stages (prune, scratch, train, cache_logits, onpolicy,
cross_tokenizer); stages.py registers them.

`LoopSettings` is the training loop's settings, declared once: a train stage's config extends
it, and so does the loop's own `TrainConfig` (train/loop.py), so a field is never copied by
name from one to the other. `OnPolicySettings` extends it the same way for the onpolicy
stage and train/onpolicy.OnPolicyConfig. Torch-free: validating a recipe imports this module.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from ..strict import Strict


def low_memory_problem(grad_clip: float, batch_size: int, micro_batch_size: int, world: int = 1) -> str | None:
    """Why stepping in the backward pass cannot honour these settings, or None."""
    if world > 1:
        return "it needs one process (data parallelism reduces gradients after the backward pass)"
    if 0 < micro_batch_size < batch_size:
        return "it needs one micro-batch per step (micro_batch_size: 0): accumulation keeps every gradient"
    if grad_clip:
        return "global-norm clipping needs every gradient at once: set grad_clip: 0"
    return None


class LoopSettings(Strict):
    """The training loop's settings (train/loop.py), shared by a train stage and the loop."""

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)  # examples (or pairs) per optimizer step, over all processes
    max_length: int = Field(256, gt=1)
    sft_weight: float = Field(0.5, ge=0)
    kd_weight: float = Field(0.5, ge=0)
    temperature: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    micro_batch_size: int = Field(0, ge=0)  # examples per forward pass (0: the whole per-process batch); batch_size stays per optimizer step
    objective: Literal["distill", "dpo"] = "distill"  # distill: SFT + KD; dpo: preference pairs
    dpo_beta: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(0, ge=0)  # steps (0: none); resume with `stillhouse run --resume`
    # optimizer step in the backward pass, an allocator that returns freed memory, and an
    # online teacher's GGUF-style weights held as their block codes, decoded exactly on use
    # (docs/training.md, "Low memory"); needs grad_clip: 0
    low_memory: bool = False
    # reuse: glibc keeps a step's freed large blocks for the next step (faster, same peak);
    # system: leave the allocator alone (train/allocator.py)
    allocator: Literal["reuse", "system"] = "reuse"


class PruneStage(Strict):
    """Depth-pruned copy of a model: keep the most important blocks, measured on calibration text."""

    type: Literal["prune"]
    model: str
    calibration: str  # a dataset stage whose prompts+completions are the calibration text
    layers: int | None = Field(None, gt=0)  # depth: blocks to keep (None: all)
    method: Literal["cosine", "loss"] = "cosine"
    calibration_size: int = Field(32, gt=0)
    protect: list[int] = []
    mlp_channels: int | None = Field(None, gt=0)  # width: MLP channels to keep in every block
    kv_heads: int | None = Field(None, gt=0)  # width: key/value head groups to keep in every block

    @model_validator(mode="after")
    def _prunes_something(self):
        if self.layers is None and self.mlp_channels is None and self.kv_heads is None:
            raise ValueError("a prune stage needs layers, mlp_channels or kv_heads")
        return self


class LoraSpec(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = True  # fold the adapters into the saved weights (a plain HF model)
    # QLoRA: the student's linear weights in 4 bits (bitsandbytes) while the adapters train
    quantize: Literal["nf4", "fp4"] | None = None


class ScratchStage(Strict):
    """A randomly initialised student of the teacher's architecture and tokenizer."""

    type: Literal["scratch"]
    teacher: str
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    seed: int = 0


# The names of train/losses.py's registry (kept here so validating a recipe never imports torch).
LossName = Literal["sft", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]


class LossTermSpec(Strict):
    name: LossName
    weight: float = Field(1.0, ge=0)
    beta: float = Field(0.5, ge=0, le=1)  # jsd: 0 is forward KL, 1 reverse KL
    alpha: float = Field(0.1, ge=0, lt=1)  # skew KLs: share of the skewed distribution in the mixture


class TrainStage(LoopSettings):
    """SFT on teacher text plus token-level KL to the teacher's logits."""

    type: Literal["train"]
    student: str
    data: str
    teacher: str | None = None  # online teacher; without it the dataset's cached top-k is used
    teacher_signal: Literal["cached", "online"] = "cached"
    heal_epochs: float = Field(0.0, ge=0)  # logit-only KD on all teacher text (failed answers too) first
    heal_lr: float = Field(2e-4, gt=0)
    log_to: list[Literal["tensorboard"]] = []  # training curves also for these trackers (metrics.jsonl always)
    lora: LoraSpec | None = None
    # The objective as a weighted mixture (docs/losses.md): {sft: 0.5, forward_kl: 0.5}, or a
    # list of {name, weight, beta, alpha}. When set it replaces sft_weight / kd_weight.
    loss: list[LossTermSpec] | None = None
    logit_cache: str | None = None  # a cache_logits stage: the offline teacher signal

    @model_validator(mode="after")
    def _low_memory_settings(self):
        if self.low_memory:
            if why := low_memory_problem(self.grad_clip, self.batch_size, self.micro_batch_size):
                raise ValueError(f"low_memory: {why}")
        return self

    @field_validator("loss", mode="before")
    @classmethod
    def _terms(cls, v):
        if isinstance(v, dict):  # the short form {name: weight}
            v = [{"name": k, "weight": w} for k, w in v.items()]
        known = get_args(LossName)
        for term in v if isinstance(v, list) else []:
            name = term.get("name") if isinstance(term, dict) else None
            if name not in known:
                raise ValueError(f"unknown loss {name!r} (known: {', '.join(known)})")
        return v

    @field_validator("loss")
    @classmethod
    def _some_weight(cls, v):
        if v is not None and sum(t.weight for t in v) <= 0:
            raise ValueError("needs at least one term with a positive weight")
        return v

    @property
    def loss_terms(self) -> list[dict]:
        """The objective as plain term dicts (name, weight, beta, alpha) for the training loop."""
        if self.loss is None:
            return [{"name": "sft", "weight": self.sft_weight}, {"name": "forward_kl", "weight": self.kd_weight}]
        return [t.model_dump() for t in self.loss]

    @property
    def uses_teacher(self) -> bool:
        return any(t["name"] != "sft" and t["weight"] > 0 for t in self.loss_terms)

    @property
    def online_kd(self) -> bool:
        """Whether the teacher's logits shape the student during training (not only a cache's)."""
        return self.teacher_signal == "online" and self.uses_teacher

    def loop_settings(self) -> dict:
        """The fields the training loop takes (train/loop.TrainConfig), by name."""
        return {f: getattr(self, f) for f in LoopSettings.model_fields}


class CacheLogitsStage(Strict):
    """The teacher scores a dataset's exact token sequences; its top-k log-probs go to a compact cache."""

    type: Literal["cache_logits"]
    teacher: str
    data: str
    top_k: int = Field(128, gt=0, le=256)
    min_prob: float = Field(0.0, ge=0, lt=1)  # entries below it join the rest bucket (docs/logit-cache.md)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(1024, gt=1)


class OnPolicySettings(LoopSettings):
    """On-policy distillation's settings: the training loop's (checkpoints, resume, schedule,
    accumulation) plus what it samples. Run by train/onpolicy.py through the shared loop."""

    method: Literal["gkd", "reverse_kl"] = "gkd"
    lmbda: float = Field(1.0, ge=0, le=1)  # gkd: share of steps sampled from the student
    beta: float = Field(0.5, ge=0, le=1)  # gkd: generalised JSD beta
    steps: int = Field(50, gt=0)  # optimizer steps (on-policy counts steps, not epochs)
    sample_temperature: float = Field(1.0, ge=0)  # the student's sampling temperature
    max_new_tokens: int = Field(32, gt=0)  # per sampled completion
    # the loop's settings with on-policy's own defaults: a constant learning rate (no warm-up,
    # no decay) as before the stage used the shared loop; set them for a schedule
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, gt=0)  # distinct prompts per step
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _loop_fields_that_do_not_apply(self):
        unused = sorted(set(_NOT_ON_POLICY) & self.model_fields_set)
        if unused:
            raise ValueError(f"{', '.join(unused)} do not apply to on-policy training (it counts steps: and its "
                             "loss is set by method:)")
        if self.low_memory and (why := low_memory_problem(self.grad_clip, self.batch_size, self.micro_batch_size)):
            raise ValueError(f"low_memory: {why}")
        return self


# LoopSettings fields an on-policy stage has no use for: set, they are refused rather than ignored.
_NOT_ON_POLICY = ("epochs", "sft_weight", "kd_weight", "temperature", "objective", "dpo_beta")


class OnPolicyStage(OnPolicySettings):
    """On-policy distillation: the student samples, the teacher scores its tokens (docs/onpolicy-and-cross-tokenizer.md)."""

    type: Literal["onpolicy"]
    student: str
    teacher: str
    data: str  # a dataset of prompts and teacher completions (a rejection stage)

    def onpolicy_settings(self) -> dict:
        """The fields on-policy training takes (train/onpolicy.OnPolicyConfig), by name."""
        return {f: getattr(self, f) for f in OnPolicySettings.model_fields if f not in _NOT_ON_POLICY}


class CrossTokenizerStage(Strict):
    """A student with another tokenizer than its teacher: SFT on the teacher's text plus ULD at aligned tokens."""

    type: Literal["cross_tokenizer"]
    student: str
    teacher: str
    data: str  # a dataset of teacher completions (a rejection stage); only their text is used
    epochs: float = Field(2.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    sft_weight: float = Field(1.0, ge=0)
    uld_weight: float = Field(1.0, ge=0)  # 0: sequence-level KD only
    top_k: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_length: int = Field(256, gt=1)
    seed: int = 0
    # the shared training loop's knobs (as a train stage's)
    grad_clip: float = Field(1.0, ge=0)
    micro_batch_size: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
