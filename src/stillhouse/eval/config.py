"""Recipe fields of the measuring stages (eval, compare, report, report_artifacts); stages.py
registers them. Torch-free."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..strict import Strict


class EvalStage(Strict):
    """Held-out accuracy, decode speed, size and KL to the teacher for several models."""

    type: Literal["eval"]
    tasks: str
    split: Literal["eval", "validation"] = "eval"  # eval: the tasks stage's test split; validation: for choosing settings
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


class EvalSettings(Strict):
    """How models are measured (eval/compare.evaluate_models); a `compare` stage's settings."""

    batch_size: int = Field(32, gt=0)  # generation batch size
    speed_batches: tuple[int, ...] = (1, 16)  # decode tokens/s is measured at each of these batch sizes
    speed_tokens: int = Field(32, gt=0)  # tokens decoded per speed measurement
    samples: int = Field(1, gt=0)  # > 1: also sample this many completions per problem for pass@k
    temperature: float = Field(0.8, ge=0)  # of those samples
    ks: tuple[int, ...] = (1,)  # pass@k for these k (at most `samples`)
    bootstrap: int = Field(2000, gt=0)  # resamples of the bootstrap intervals
    seed: int = 0
    memory: bool = True  # peak RSS in a fresh process per model
    system_prompt: str | None = None
    perplexity_file: str | None = None  # held-out text: .txt (blank-line separated) or .jsonl with "text"


class CompareStage(EvalSettings):
    """Models on evaluation suites, side by side (`stillhouse eval` and `compare` run one as a one-stage recipe)."""

    type: Literal["compare"]
    models: list[str] = Field(min_length=1)  # model references; with first_is_teacher the first is the teacher
    suites: list[str] = Field(min_length=1)  # rg:TASK[,k=v..], humaneval[,size=N] or jsonl:PATH[,..] (eval/suites.py)
    first_is_teacher: bool = True  # students are also measured against it (agreement, KL, fractions)

    def external_files(self) -> list[str]:
        """Files the evaluation reads: edited content is a new evaluation (part of the artifact id)."""
        files = [s.split(",")[0][len("jsonl:"):] for s in self.suites if s.startswith("jsonl:")]
        return files + ([self.perplexity_file] if self.perplexity_file else [])


class ReportArtifactsStage(Strict):
    """A report (as a `report` stage's) on artifacts that already exist anywhere: `stillhouse report`
    runs one as a one-stage recipe."""

    type: Literal["report_artifacts"]
    artifacts: list[str] = Field(min_length=1)  # eval and trained-model artifact directories
    title: str | None = None
