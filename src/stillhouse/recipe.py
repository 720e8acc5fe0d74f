"""Recipes: YAML validated by pydantic into a DAG of typed stages.

A recipe names its models (`models:`) and its stages (`stages:`); each stage has a `type`
and fields of its own. Fields that refer to other things hold names: a model field names an
entry of `models:` or a stage that produces a model; a data field names a stage. Unknown
keys, wrong types, unknown stage types, models, tasks or references are rejected with one
line that names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.config import (  # the data-engine stages' fields live with the data engine
    DATA_STAGE_TYPES, CompleteStage, CritiqueReviseStage, DataOptions, PreferenceStage, SelfInstructStage,
)
from .errors import StillhouseError
from .lineage.policy import Origin, Policy
from .teachers.config import BACKENDS, TeacherConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Split(Strict):
    size: int = Field(gt=0)
    seed: int = 0


class TasksStage(Strict):
    """Procedural problems with verifiers (reasoning-gym), as a train and a held-out split."""

    type: Literal["tasks"]
    task: str
    config: dict[str, Any] = {}
    train: Split
    eval: Split
    # Repeats are part of a generator's distribution (small tasks repeat their easy cases);
    # removing them shifts training away from what the held-out split measures.
    dedup: bool = False

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from .verify.reasoning_gym import task_names

        if v not in task_names() and v != "humaneval":
            raise ValueError(f"unknown task '{v}'")
        return v

    @model_validator(mode="after")
    def _known_config(self):
        from .verify.reasoning_gym import make_dataset

        if self.task == "humaneval":  # HumanEval's fixed problems (code verifier); no config
            if self.config:
                raise ValueError("config: the humaneval task takes no config")
            return self
        try:  # building a one-problem generator checks the config keys and values cheaply
            make_dataset(self.task, self.config, 1, 0)
        except StillhouseError as e:
            raise ValueError(str(e)) from None
        return self


class RejectionStage(DataOptions):
    """Teacher samples answers; the task's verifier keeps the correct ones."""

    type: Literal["rejection"]
    teacher: str
    tasks: str
    verifier: Literal["auto", "reasoning_gym", "math", "code"] = "auto"  # auto: the tasks stage's own
    shard_size: int = Field(256, gt=0)  # problems per resumable unit; larger units batch the sampling pass better
    samples: int = Field(4, ge=0)
    greedy_first: bool = True
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, gt=0)
    keep_per_problem: int = Field(4, gt=0)
    top_k_logprobs: int = Field(0, ge=0)
    system_prompt: str | None = None
    batch_size: int = Field(64, gt=0)
    seed: int = 0


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


class TrainStage(Strict):
    """SFT on teacher text plus token-level KL to the teacher's logits."""

    type: Literal["train"]
    student: str
    data: str
    teacher: str | None = None  # online teacher; without it the dataset's cached top-k is used
    teacher_signal: Literal["cached", "online"] = "cached"
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(256, gt=1)
    sft_weight: float = Field(0.5, ge=0)
    kd_weight: float = Field(0.5, ge=0)
    temperature: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    heal_epochs: float = Field(0.0, ge=0)  # logit-only KD on all teacher text (failed answers too) first
    heal_lr: float = Field(2e-4, gt=0)
    seed: int = 0
    log_to: list[Literal["tensorboard"]] = []  # training curves also for these trackers (metrics.jsonl always)
    micro_batch_size: int = Field(0, ge=0)  # examples per forward pass; batch_size stays per optimizer step
    objective: Literal["distill", "dpo"] = "distill"
    dpo_beta: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(0, ge=0)  # steps; resume with `stillhouse run --resume`
    lora: LoraSpec | None = None
    # The objective as a weighted mixture (docs/losses.md): {sft: 0.5, forward_kl: 0.5}, or a
    # list of {name, weight, beta, alpha}. When set it replaces sft_weight / kd_weight.
    loss: list[LossTermSpec] | None = None
    logit_cache: str | None = None  # a cache_logits stage: the offline teacher signal
    # optimizer step in the backward pass and an allocator that returns freed memory
    # (docs/training.md, "Low memory"); needs grad_clip: 0
    low_memory: bool = False
    # reuse: glibc keeps a step's freed large blocks for the next step (faster, same peak);
    # system: leave the allocator alone (train/allocator.py)
    allocator: Literal["reuse", "system"] = "reuse"

    @model_validator(mode="after")
    def _low_memory_settings(self):
        if self.low_memory:
            from .train.low_memory import problem

            if why := problem(self.grad_clip, self.batch_size, self.micro_batch_size):
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


class EvalStage(Strict):
    """Held-out accuracy, decode speed, size and KL to the teacher for several models."""

    type: Literal["eval"]
    tasks: str
    teacher: str
    models: dict[str, str]  # label -> model reference; the teacher is evaluated first as "teacher"
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)
    speed_batch: int = Field(16, gt=0)
    system_prompt: str | None = None
    suites: list[str] = []  # more suites beside the tasks' held-out split (see eval/suites.py)
    samples: int = Field(1, gt=0)  # > 1: sampled completions per problem for pass@k
    memory: bool = True  # peak RSS of each model in a fresh process
    perplexity_text: str | None = None  # held-out text (.txt or .jsonl with "text") for perplexity


class ReportStage(Strict):
    """A terminal table, report.md and a self-contained report.html (charts inlined) from evaluations and training histories."""

    type: Literal["report"]
    evals: list[str]
    training: list[str] = []
    title: str | None = None


class ImportStage(Strict):
    """Prompt/completion pairs brought in from a JSONL or Parquet file, encoded for one model's tokenizer.

    `origin` declares who wrote the completions and under which terms; without it lineage
    shows the data's origin as unknown (never as clean)."""

    type: Literal["import"]
    path: str
    tokenizer: str  # a model whose tokenizer (and chat template) encodes the rows
    origin: Origin | None = None
    system_prompt: str | None = None
    sha256: str | None = None  # of the file; filled in when the recipe loads, so edits give a new artifact

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).expanduser().is_file():
            raise ValueError(f"file not found: {v}")
        return v

    @model_validator(mode="after")
    def _hash_file(self):
        from .fsutil import sha256_file

        digest = sha256_file(Path(self.path).expanduser())
        if self.sha256 is not None and self.sha256 != digest:
            raise ValueError(f"sha256: {self.path} has changed (hash {digest[:12]}..., recipe says {self.sha256[:12]}...)")
        self.sha256 = digest
        return self


class MixStage(Strict):
    """Several datasets as one; with `tokenizer`, every row is re-encoded for that model (cached top-k dropped)."""

    type: Literal["mix"]
    datasets: list[str] = Field(min_length=1)
    tokenizer: str | None = None
    system_prompt: str | None = None


class CacheLogitsStage(Strict):
    """The teacher scores a dataset's exact token sequences; its top-k log-probs go to a compact cache."""

    type: Literal["cache_logits"]
    teacher: str
    data: str
    top_k: int = Field(128, gt=0, le=256)
    min_prob: float = Field(0.0, ge=0, lt=1)  # entries below it join the rest bucket (docs/logit-cache.md)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(1024, gt=1)


class OnPolicyStage(Strict):
    """On-policy distillation: the student samples, the teacher scores its tokens (docs/onpolicy-and-cross-tokenizer.md)."""

    type: Literal["onpolicy"]
    student: str
    teacher: str
    data: str  # a dataset of prompts and teacher completions (a rejection stage)
    method: Literal["gkd", "reverse_kl"] = "gkd"
    lmbda: float = Field(1.0, ge=0, le=1)  # gkd: share of batches sampled from the student
    beta: float = Field(0.5, ge=0, le=1)  # gkd: generalised JSD beta
    steps: int = Field(50, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-4, gt=0)
    sample_temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(32, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0


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


Stage = Annotated[
    Union[TasksStage, RejectionStage, PruneStage, TrainStage, EvalStage, ReportStage, ImportStage, MixStage,
          CompleteStage, PreferenceStage, CritiqueReviseStage, SelfInstructStage, ScratchStage,
          CacheLogitsStage, OnPolicyStage, CrossTokenizerStage],
    Field(discriminator="type"),
]

# Which artifact kind each stage type writes, and which of its fields name other things.
STAGE_KIND = {"tasks": "dataset", "rejection": "dataset", "prune": "model", "train": "model", "eval": "eval", "report": "report"}
MODEL_FIELDS = {"rejection": ["teacher"], "prune": ["model"], "train": ["student", "teacher"], "eval": ["teacher"]}
DATA_FIELDS = {"rejection": ["tasks"], "prune": ["calibration"], "train": ["data"], "eval": ["tasks"], "report": []}
# lineage stages (issue 6): imported data and mixes
STAGE_KIND.update({"import": "dataset", "mix": "dataset"})
MODEL_FIELDS.update({"import": ["tokenizer"], "mix": ["tokenizer"]})
for _t in DATA_STAGE_TYPES:
    STAGE_KIND[_t] = "dataset"
    MODEL_FIELDS[_t] = ["teacher"] + (["judge"] if _t == "preference" else [])
    DATA_FIELDS[_t] = ["prompts"]
STAGE_KIND["scratch"] = "model"
MODEL_FIELDS["scratch"] = ["teacher"]
DATA_FIELDS["scratch"] = []
STAGE_KIND.update(cache_logits="logit_cache", onpolicy="model", cross_tokenizer="model")
MODEL_FIELDS.update(cache_logits=["teacher"], onpolicy=["student", "teacher"], cross_tokenizer=["student", "teacher"])
DATA_FIELDS.update(cache_logits=["data"], onpolicy=["data"], cross_tokenizer=["data"])
CACHE_FIELDS = {"train": ["logit_cache"]}  # fields that name a cache_logits stage


class Recipe(Strict):
    name: str
    description: str = ""
    models: dict[str, str] = {}
    teachers: dict[str, TeacherConfig] = {}  # named teacher backends a stage's `teacher:` may name
    stages: dict[str, Stage]
    policy: Policy | None = None  # licence/terms policy, checked before any compute (lineage/policy.py)

    def refs(self, name: str) -> list[tuple[str, str, str]]:
        """(field, referenced name, expected: model|data|eval|model-stage) for one stage."""
        st = self.stages[name]
        out = []
        for f in MODEL_FIELDS.get(st.type, []):
            v = getattr(st, f)
            if v is not None:
                out.append((f, v, "model"))
        for f in DATA_FIELDS.get(st.type, []):
            if getattr(st, f) is not None:
                out.append((f, getattr(st, f), "data"))
        for f in CACHE_FIELDS.get(st.type, []):
            if getattr(st, f) is not None:
                out.append((f, getattr(st, f), "logit_cache"))
        if st.type == "eval":
            out += [(f"models.{k}", v, "model") for k, v in st.models.items()]
        if st.type == "report":
            out += [(f"evals[{i}]", v, "eval") for i, v in enumerate(st.evals)]
            out += [(f"training[{i}]", v, "train") for i, v in enumerate(st.training)]
        if st.type == "mix":
            out += [(f"datasets[{i}]", v, "data") for i, v in enumerate(st.datasets)]
        out += getattr(st, "extra_refs", lambda: [])()  # e.g. decontamination sets named by stage
        return out

    def stage_deps(self, name: str) -> list[str]:
        return [ref for _, ref, _ in self.refs(name) if ref in self.stages]

    def order(self) -> list[str]:
        """Stages in dependency order (stable: recipe order among independent stages)."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(n: str, path: list[str]):
            if n in done:
                return
            if n in visiting:
                raise StillhouseError(f"recipe has a cycle: {' -> '.join(path + [n])}")
            visiting.add(n)
            for d in self.stage_deps(n):
                visit(d, path + [n])
            visiting.discard(n)
            done.append(n)

        for n in self.stages:
            visit(n, [])
        return done


def _check_refs(recipe: Recipe) -> None:
    from . import models as model_specs

    for name, spec in recipe.models.items():
        if name in recipe.stages:
            raise ValueError(f"models.{name}: name is also a stage")
        _check_model_spec(spec, f"models.{name}", model_specs)
    _check_teachers(recipe, model_specs)
    for sname in recipe.stages:
        for field, ref, expected in recipe.refs(sname):
            key = f"stages.{sname}.{field}"
            if ref in recipe.stages:
                produced = STAGE_KIND[recipe.stages[ref].type]
                want = {"model": "model", "data": "dataset", "eval": "eval", "train": "model", "logit_cache": "logit_cache"}[expected]
                if produced != want:
                    raise ValueError(f"{key}: stage '{ref}' produces a {produced}, not a {want}")
                if expected == "train" and recipe.stages[ref].type != "train":
                    raise ValueError(f"{key}: stage '{ref}' is not a train stage")
                if expected == "data" and sname != ref and recipe.stages[sname].type in ("rejection", "eval") and recipe.stages[ref].type != "tasks":
                    raise ValueError(f"{key}: stage '{ref}' is not a tasks stage")
            elif expected == "model" and ref in recipe.models:
                continue
            elif expected == "model" and ref in recipe.teachers:
                _check_teacher_use(recipe, sname, field, ref, key)
            elif expected == "model":
                _check_model_spec(ref, key, model_specs)
            else:
                raise ValueError(f"{key}: unknown stage '{ref}'")


# Stage fields that need local weights (logits, scoring), not only generated text.
WHITE_BOX_FIELDS = {("train", "teacher"), ("eval", "teacher")}


def _check_teachers(recipe: Recipe, model_specs) -> None:
    for name, t in recipe.teachers.items():
        if name in recipe.stages or name in recipe.models:
            raise ValueError(f"teachers.{name}: name is also a {'stage' if name in recipe.stages else 'model'}")
        for fld in ("model", "tokenizer"):
            spec = getattr(t, fld, None)
            if spec and (t.backend != "openai" or fld == "tokenizer"):
                _check_model_spec(spec, f"teachers.{name}.{fld}", model_specs)


def _check_teacher_use(recipe: Recipe, sname: str, field: str, ref: str, key: str) -> None:
    stage_type = recipe.stages[sname].type
    backend = recipe.teachers[ref].backend
    if field != "teacher" and backend != "hf":
        raise ValueError(f"{key}: '{ref}' is a {backend} teacher, not a model")
    if (stage_type, field) in WHITE_BOX_FIELDS and backend != "hf":
        raise ValueError(f"{key}: teacher '{ref}' ({backend}) only generates text; this stage needs its logits (backend: hf)")


def _check_model_spec(spec: str, key: str, model_specs) -> None:
    """Cheap validation of a model spec (no loading): built-in, existing path, or hub id."""
    import re

    p = Path(spec).expanduser()
    if spec in model_specs.BUILTINS:
        return
    if p.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        if not p.exists():
            raise ValueError(f"{key}: model path not found: {spec}")
        return
    if p.exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return
    raise ValueError(f"{key}: unknown model '{spec}' (built-ins: {', '.join(model_specs.BUILTINS)})")


def _format_validation_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    # pydantic puts the discriminator value in the path of union members; keep it readable
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown stage type {err.get('input', {}).get('type')!r}" if isinstance(err.get("input"), dict) else msg
    elif err["type"] == "union_tag_not_found":
        msg = "stage needs a 'type'"
    parts = [str(x) for x in err["loc"]]
    if parts[:1] == ["teachers"]:
        if err["type"] == "union_tag_invalid":
            msg = f"unknown backend (known: {', '.join(BACKENDS)})"
        elif err["type"] == "union_tag_not_found":
            msg = f"teacher needs a 'backend' ({', '.join(BACKENDS)})"
        if len(parts) >= 3 and parts[2] in BACKENDS:
            parts.pop(2)
        loc = ".".join(parts)
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in STAGE_KIND:
        parts.pop(2)  # drop the discriminator tag pydantic inserts
        loc = ".".join(parts)
    return f"{loc}: {msg}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise StillhouseError(f"{source}: a recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data)
        _check_refs(recipe)
        recipe.order()
    except ValidationError as e:
        raise StillhouseError(f"{source}: {_format_validation_error(e)}") from None
    except ValueError as e:
        raise StillhouseError(f"{source}: {e}") from None
    except StillhouseError as e:
        raise StillhouseError(f"{source}: {e}") from None
    if not recipe.stages:
        raise StillhouseError(f"{source}: stages: a recipe needs at least one stage")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise StillhouseError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise StillhouseError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    return parse_recipe(data, str(path))


def builtin_recipe(name: str) -> Path:
    path = Path(__file__).parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise StillhouseError(f"no built-in recipe '{name}' (built-in: {known})")
    return path
