"""Recipe fields of the dataset stages: problems from a task generator, verified teacher
traces, imported and mixed data, and the data-engine stages; stages.py registers them.

Shared pieces are mixins: `DataOptions` (resumable shards, dedup, decontamination: every
generating dataset stage), `PromptSource` (a dataset stage or a prompt file) and
`Generation` (teacher and sampling settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import StillhouseError
from ..strict import Strict
from ..fsutil import expand_user


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

    def external_files(self) -> list[Path]:
        return [Path(v) for v in self.decontaminate if v.endswith((".jsonl", ".parquet"))]


class Split(Strict):
    size: int = Field(gt=0)  # problems drawn (train and validation may end smaller after cross-split dedup)
    seed: int = 0  # reasoning-gym seeds problem i with seed + i: splits need seed ranges that do not overlap
    # generator settings for this split only, over the stage's `config` (e.g. training on more
    # term counts and digit lengths than the test split asks, so the skill is learnt and not the
    # few hundred questions a small space has); the splits stay disjoint by question text
    config: dict[str, Any] = {}


class TasksStage(Strict):
    """Procedural problems with verifiers (reasoning-gym), as train, optional validation and
    held-out (test) splits, disjoint by question text (data/splits.py)."""

    type: Literal["tasks"]
    task: str
    config: dict[str, Any] = {}
    train: Split
    # Choose settings on this split (an eval stage with `split: validation`); never report it as the result.
    validation: Split | None = None
    eval: Split  # the held-out test split: report only; drawn first and never trimmed
    # Repeats are part of a generator's distribution (small tasks repeat their easy cases);
    # removing them shifts training away from what the held-out split measures.
    dedup: bool = False

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from ..verify.reasoning_gym import task_names

        if v not in task_names() and v != "humaneval":
            raise ValueError(f"unknown task '{v}'")
        return v

    @model_validator(mode="after")
    def _seed_ranges_apart(self):
        # item i of a split is generated from seed + i, so overlapping ranges repeat whole problems
        # (the overlap is removed by question text either way; three-split recipes, which choose
        # settings on validation, are held to far-apart seeds; older two-split ones are not)
        if self.validation is None:
            return self
        named = [("train", self.train), ("validation", self.validation), ("eval", self.eval)]
        spans = [(n, s.seed, s.seed + s.size) for n, s in named if s is not None]
        for i, (a, a0, a1) in enumerate(spans):
            for b, b0, b1 in spans[i + 1 :]:
                if a0 < b1 and b0 < a1:
                    raise ValueError(f"{b}.seed: seeds {b0}..{b1 - 1} overlap {a}'s {a0}..{a1 - 1}; use far-apart seeds")
        return self

    @model_validator(mode="after")
    def _known_config(self):
        from ..verify.reasoning_gym import make_dataset

        if self.task == "humaneval":  # HumanEval's fixed problems (code verifier); no config
            if self.config or any(s is not None and s.config for s in (self.train, self.validation, self.eval)):
                raise ValueError("config: the humaneval task takes no config")
            return self
        for name in ("train", "validation", "eval"):
            split = getattr(self, name)
            if split is None or (split.config == {} and name != "eval"):
                continue
            try:  # building a one-problem generator checks the config keys and values cheaply
                make_dataset(self.task, self.split_config(name), 1, 0)
            except StillhouseError as e:
                raise ValueError(f"{name}.config: {e}" if split.config else str(e)) from None
        return self

    def split_config(self, name: str) -> dict[str, Any]:
        """The generator settings of split `name` ("train", "validation", "eval")."""
        return {**self.config, **getattr(self, name).config}


class TeacherPrompt(Strict):
    """What the teacher sees at generation time in place of the plain prompt (context
    distillation): worked examples and instructions make more of its answers verify, while
    every record keeps the plain prompt, so the student learns to answer without them."""

    system_prompt: str | None = None  # replaces the stage's system_prompt for the teacher only
    examples: list[tuple[str, str]] = []  # (question, answer) chat turns shown before the question
    template: str = "{question}"  # the teacher's user turn; {question} is the problem's own text

    @field_validator("template")
    @classmethod
    def _question_placeholder(cls, v: str) -> str:
        return _needs(v, "question")


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
    # context distillation: the teacher answers this richer prompt; records keep the plain one
    # (its top-k log-probs are the teacher's under the richer prompt); None: the plain prompt
    teacher_prompt: TeacherPrompt | None = None
    batch_size: int = Field(64, gt=0)
    seed: int = 0


class Origin(Strict):
    """Where imported data came from: a teacher model or an API, and the terms it is under."""

    teacher: str | None = None
    api: str | None = None
    license: str | None = None


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
        if not expand_user(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v

    @model_validator(mode="after")
    def _hash_file(self):
        from ..fsutil import sha256_file

        digest = sha256_file(expand_user(self.path))
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


class FilterStage(Strict):
    """The records of a dataset that pass a verifier and a completion-length bound; the rest are dropped."""

    type: Literal["filter"]
    data: str  # a dataset stage whose records have `completion` / `completion_ids` (rejection, complete, import, mix)
    # keep the records this verifier passes; auto: the data's own tasks stage's verifier (verify/choose.py)
    verifier: Literal["none", "auto", "reasoning_gym", "math", "code"] = "none"
    min_completion_tokens: int = Field(0, ge=0)  # completion token ids, end-of-turn included
    max_completion_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _filters_something(self):
        if self.verifier == "none" and self.min_completion_tokens == 0 and self.max_completion_tokens is None:
            raise ValueError("a filter stage needs a verifier, min_completion_tokens or max_completion_tokens")
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.min_completion_tokens:
            raise ValueError("max_completion_tokens: less than min_completion_tokens")
        return self


def names_a_stage(entry: str) -> bool:
    """Whether a `decontaminate` entry names a dataset stage (not a file or a built-in set)."""
    return entry != "humaneval" and not entry.endswith((".jsonl", ".parquet"))


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
