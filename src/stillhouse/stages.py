"""The stage types: each declared once, here.

A stage type is
- its config class: a pydantic model with `type: Literal["<name>"]`, next to its code
  (data/config.py, train/config.py, eval/config.py);
- the artifact kind it writes;
- its references: the config fields that name other stages or models (`Ref`), with what
  validation, lineage and the licence policy need to know about each;
- how it runs: its run function (imported only when the stage runs), whether it runs on every
  process under a launcher, whether unfinished work survives a crash.

The recipe parser, the runner and the licence policy read this table; none of them names a
stage type. Adding a stage is a config class, a run function and one `register` call below
(docs/writing-a-stage.md). Torch-free: `stillhouse validate` imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from .data.config import (
    CompleteStage, CritiqueReviseStage, FilterStage, ImportStage, MixStage, PreferenceStage, RejectionStage,
    SelfInstructStage, TasksStage, names_a_stage,
)
from .eval.config import CompareStage, EvalStage, ReportArtifactsStage, ReportStage
from .train.config import (
    CacheLogitsStage, CrossTokenizerStage, OnPolicyStage, PruneStage, ScratchStage, TrainStage,
)

# Artifact kinds a stage writes (artifacts.KINDS).
MODEL, DATASET, EVAL, REPORT, LOGIT_CACHE = "model", "dataset", "eval", "report", "logit_cache"


@dataclass(frozen=True)
class Ref:
    """A config field that names other stages or models (a string, a list, or a dict of them)."""

    field: str
    expects: str  # the artifact kind a named stage must write; MODEL also takes a models:/teachers: entry or a spec
    # What flows from the named thing into this stage's artifact, for lineage and the licence
    # policy: its weights (a student), its outputs (a teacher's text or logits), its data
    # (the sources of a dataset stage), or nothing (a tokenizer, calibration text, what an eval measures).
    carries: Literal["weights", "outputs", "data"] | None = None
    # model: needs a local model (weights or tokenizer); teacher: any teacher backend;
    # logits: a teacher whose logits are read (backend hf).
    role: Literal["model", "teacher", "logits"] = "model"
    types: tuple[str, ...] = ()  # a named stage must be of one of these types (empty: any of kind `expects`)
    when: Callable[[Any], bool] | None = None  # `carries` holds only when this is true of the config
    pick: Callable[[str], bool] | None = None  # list fields: which entries are references (others are files)

    def carried(self, config) -> str | None:
        return self.carries if self.when is None or self.when(config) else None


@dataclass(frozen=True)
class StageType:
    name: str
    config: type  # the pydantic config class; its `type` field is Literal[name]
    kind: str  # the artifact kind it writes
    run: str  # "module:function" under the stillhouse package; imported when the stage runs
    refs: tuple[Ref, ...] = ()
    parallel: bool = False  # under a launcher, runs on every process (the shared training loop is data parallel)
    resumable: bool = False  # unfinished work is kept across a crash (artifacts.ArtifactStore.create)
    origin: str | None = None  # the config field declaring where outside data came from (lineage/policy)

    def run_function(self) -> Callable:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(f"stillhouse.{module}"), function)


STAGES: dict[str, StageType] = {}


def register(entry: StageType) -> StageType:
    if entry.name in STAGES:
        raise ValueError(f"stage type '{entry.name}' is registered twice")
    if get_args(entry.config.model_fields["type"].annotation) != (entry.name,):
        raise ValueError(f"stage type '{entry.name}': {entry.config.__name__}.type must be Literal['{entry.name}']")
    for ref in entry.refs:
        if ref.field not in entry.config.model_fields:
            raise ValueError(f"stage type '{entry.name}': {entry.config.__name__} has no field '{ref.field}'")
    STAGES[entry.name] = entry
    return entry


def _teacher(carries: str | None = "outputs", role: str = "teacher", **kw) -> Ref:
    return Ref("teacher", MODEL, carries, role, **kw)


def _data(field: str = "data", carries: str | None = "data", **kw) -> Ref:
    return Ref(field, DATASET, carries, **kw)


def _student() -> Ref:
    return Ref("student", MODEL, "weights")


def _decontaminate(**kw) -> Ref:  # evaluation sets named by stage; they shape nothing
    return Ref("decontaminate", DATASET, pick=names_a_stage, **kw)


_TASKS = ("tasks",)

register(StageType("tasks", TasksStage, DATASET, "data.stages:run_tasks"))
register(StageType("rejection", RejectionStage, DATASET, "data.stages:run_rejection", resumable=True,
                   refs=(_teacher(), _data("tasks", types=_TASKS), _decontaminate(types=_TASKS))))
register(StageType("import", ImportStage, DATASET, "data.imports:run_import", refs=(Ref("tokenizer", MODEL),),
                   origin="origin"))
register(StageType("mix", MixStage, DATASET, "data.imports:run_mix",
                   refs=(Ref("tokenizer", MODEL), _data("datasets"))))
register(StageType("complete", CompleteStage, DATASET, "data.complete:run_complete", resumable=True,
                   refs=(_teacher(), _data("prompts"), _decontaminate())))
register(StageType("preference", PreferenceStage, DATASET, "data.preference:run_preference", resumable=True,
                   refs=(_teacher(), Ref("judge", MODEL, "outputs"), _data("prompts"), _decontaminate())))
register(StageType("critique_revise", CritiqueReviseStage, DATASET, "data.critique:run_critique_revise", resumable=True,
                   refs=(_teacher(), _data("prompts"), _decontaminate())))
register(StageType("self_instruct", SelfInstructStage, DATASET, "data.self_instruct:run_self_instruct", resumable=True,
                   refs=(_teacher(), _data("prompts"), _decontaminate())))
register(StageType("filter", FilterStage, DATASET, "data.filter:run_filter", refs=(_data(),)))
# a pruned model is its parent's weights; the calibration text only picks which to keep
register(StageType("prune", PruneStage, MODEL, "train.stages:run_prune",
                   refs=(Ref("model", MODEL, "weights"), _data("calibration", carries=None))))
# a scratch student takes only the teacher's tokenizer and shape
register(StageType("scratch", ScratchStage, MODEL, "train.stages:run_scratch", refs=(_teacher(carries=None),)))
# a train stage's teacher shapes the student only through an online KD loss (else a cache or the data carry it)
register(StageType("train", TrainStage, MODEL, "train.stages:run_train", parallel=True,
                   refs=(_student(), _teacher(role="logits", when=lambda c: c.online_kd), _data(),
                         Ref("logit_cache", LOGIT_CACHE, "data"))))
register(StageType("cache_logits", CacheLogitsStage, LOGIT_CACHE, "train.kd_stages:run_cache_logits",
                   refs=(_teacher(), _data())))
register(StageType("onpolicy", OnPolicyStage, MODEL, "train.kd_stages:run_onpolicy",
                   refs=(_student(), _teacher(), _data())))
register(StageType("cross_tokenizer", CrossTokenizerStage, MODEL, "train.kd_stages:run_cross_tokenizer", parallel=True,
                   refs=(_student(), _teacher(), _data())))
# evaluations and reports measure: nothing they name flows into what they write
register(StageType("eval", EvalStage, EVAL, "eval.stages:run_eval",
                   refs=(_teacher(carries=None, role="logits"), _data("tasks", carries=None, types=_TASKS),
                         Ref("models", MODEL))))
register(StageType("report", ReportStage, REPORT, "eval.report:run_report",
                   refs=(Ref("evals", EVAL), Ref("training", MODEL, types=("train",)))))
# the CLI's `eval`/`compare` and `report` as one-stage recipes: they read outside models and artifacts
register(StageType("compare", CompareStage, EVAL, "eval.compare:run_compare", refs=(Ref("models", MODEL),)))
register(StageType("report_artifacts", ReportArtifactsStage, REPORT, "eval.report:run_report_artifacts"))
