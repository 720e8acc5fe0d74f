"""Recipe fields of the measuring stages (eval, report); stages.py registers them. Torch-free."""

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
