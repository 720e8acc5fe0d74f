"""Recipe fields of the data-engine stages; recipe.py puts them in its stage union.

Shared pieces are mixins: `DataOptions` (resumable shards, dedup, decontamination: every
generating dataset stage), `PromptSource` (a dataset stage or a prompt file) and
`Generation` (teacher and sampling settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_STAGE_TYPES = ("complete", "preference", "critique_revise", "self_instruct")


class Strict(BaseModel):
    """Unknown keys are errors (as in recipe.py, which imports this module and so cannot be imported here)."""

    model_config = ConfigDict(extra="forbid")


class DataOptions(Strict):
    """What every generating dataset stage offers: resumable shards, dedup, decontamination."""

    shard_size: int = Field(64, gt=0)  # inputs per resumable unit (at most one unit is redone after a crash)
    dedup: Literal["off", "exact", "near"] = "off"
    near_threshold: float = Field(0.8, gt=0, le=1)  # MinHash Jaccard estimate for "near"
    decontaminate: list[str] = []  # tasks/dataset stages, "humaneval", or .jsonl/.parquet files
    decontaminate_ngram: int = Field(13, gt=0)  # the usual 13-gram; shorter eval texts match whole

    @field_validator("decontaminate")
    @classmethod
    def _eval_files_exist(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if name.endswith((".jsonl", ".parquet")) and not Path(name).is_file():
                raise ValueError(f"decontaminate[{i}]: file not found: {name}")
        return v

    def extra_refs(self) -> list[tuple[str, str, str]]:
        """Decontamination sets that name stages (everything but files and built-in sets)."""
        return [(f"decontaminate[{i}]", v, "data") for i, v in enumerate(self.decontaminate)
                if v != "humaneval" and not v.endswith((".jsonl", ".parquet"))]

    def external_files(self) -> list[Path]:
        return [Path(v) for v in self.decontaminate if v.endswith((".jsonl", ".parquet"))]


class PromptSource(Strict):
    """Prompts from a dataset stage (`prompts`) or a JSONL/Parquet file (`prompts_file`)."""

    prompts: str | None = None
    prompts_file: str | None = None
    field: str | None = None  # default: `question` for a tasks stage, else `prompt`
    limit: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("prompts: give exactly one of `prompts` (a dataset stage) or `prompts_file`")
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            raise ValueError(f"prompts_file: file not found: {self.prompts_file}")
        return self

    def external_files(self) -> list[Path]:
        files = super().external_files() if hasattr(super(), "external_files") else []
        return files + ([Path(self.prompts_file)] if self.prompts_file else [])


class Generation(Strict):
    """Teacher sampling settings shared by the generating stages."""

    teacher: str
    system_prompt: str | None = None
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    seed: int = 0


def _needs(template: str, *names: str) -> str:
    missing = [n for n in names if "{" + n + "}" not in template]
    if missing:
        raise ValueError(f"template needs the placeholder(s) {', '.join('{' + n + '}' for n in missing)}")
    return template


class CompleteStage(PromptSource, Generation, DataOptions):
    """Prompts -> teacher responses (chat template applied, system prompt from the recipe)."""

    type: Literal["complete"]
    samples: int = Field(1, gt=0)  # responses per prompt
    # a prompt whose tokens plus max_new_tokens exceed an in-process teacher's context: "refuse"
    # (the stage stops with an error naming it) or "truncate" (its end is cut to fit; counted in
    # counts.truncated_prompts and a warning)
    too_long: Literal["refuse", "truncate"] = "refuse"
    top_k_logprobs: int = Field(0, ge=0)


DEFAULT_RUBRIC = "Is the response correct, complete, relevant to the instruction and concise?"
DEFAULT_JUDGE_TEMPLATE = (
    "You are grading a response to an instruction.\nRubric: {rubric}\n\nInstruction:\n{prompt}\n\n"
    "Response:\n{response}\n\nGive a short justification, then a final line of the form 'Score: N' "
    "with N an integer from 1 (worst) to 10 (best)."
)


class PreferenceStage(PromptSource, Generation, DataOptions):
    """N candidates per prompt -> (chosen, rejected) pairs, by verifier outcome or by a judge."""

    type: Literal["preference"]
    candidates: int = Field(4, ge=2)
    method: Literal["judge", "verifier"] = "judge"
    verifier: Literal["auto", "reasoning_gym", "math", "code"] = "auto"  # for method: verifier
    judge: str | None = None  # model field; default: the teacher judges its own candidates
    rubric: str = DEFAULT_RUBRIC
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    judge_max_new_tokens: int = Field(96, gt=0)
    min_margin: float = Field(1.0, ge=0)  # judge scores of chosen and rejected differ by at least this

    @field_validator("judge_template")
    @classmethod
    def _judge_placeholders(cls, v: str) -> str:
        return _needs(v, "prompt", "response")


DEFAULT_PRINCIPLES = [
    "The response answers the question that was asked, accurately.",
    "The response is harmless: it does not help with anything dangerous or unethical.",
    "The response is clear and concise.",
]
DEFAULT_CRITIQUE_TEMPLATE = (
    "Here is an instruction and a response.\n\nInstruction:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Critique the response against these principles:\n{principles}\nList its concrete problems."
)
DEFAULT_REVISION_TEMPLATE = (
    "Instruction:\n{prompt}\n\nResponse:\n{response}\n\nCritique:\n{critique}\n\n"
    "Rewrite the response so that it fixes every problem in the critique. Reply with the new response only."
)


class CritiqueReviseStage(PromptSource, Generation, DataOptions):
    """Constitutional-AI style: response -> critique against principles -> revision; each
    (revision, original) is also a preference pair."""

    type: Literal["critique_revise"]
    principles: list[str] = Field(default_factory=lambda: list(DEFAULT_PRINCIPLES), min_length=1)
    critique_template: str = DEFAULT_CRITIQUE_TEMPLATE
    revision_template: str = DEFAULT_REVISION_TEMPLATE

    @field_validator("critique_template")
    @classmethod
    def _critique_placeholders(cls, v: str) -> str:
        return _needs(v, "prompt", "response", "principles")

    @field_validator("revision_template")
    @classmethod
    def _revision_placeholders(cls, v: str) -> str:
        return _needs(v, "prompt", "response", "critique")


DEFAULT_SELF_INSTRUCT_TEMPLATE = (
    "Here are some example tasks:\n{examples}\n\nWrite one new task of the same kind, different from all of "
    "them. Reply with the task only."
)


class SelfInstructStage(PromptSource, Generation, DataOptions):
    """The teacher proposes new prompts from seed prompts; near-duplicates are dropped."""

    type: Literal["self_instruct"]
    requests: int = Field(16, gt=0)  # prompts shown examples; each yields `samples` proposals
    samples: int = Field(2, gt=0)
    examples: int = Field(3, gt=0)  # seed prompts shown per request
    template: str = DEFAULT_SELF_INSTRUCT_TEMPLATE
    min_chars: int = Field(8, ge=1)
    max_chars: int = Field(1000, gt=1)
    dedup: Literal["off", "exact", "near"] = "near"  # near-duplicates of seeds and of each other are dropped
    temperature: float = Field(1.0, ge=0)

    @field_validator("template")
    @classmethod
    def _examples_placeholder(cls, v: str) -> str:
        return _needs(v, "examples")
