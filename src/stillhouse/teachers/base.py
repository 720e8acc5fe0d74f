"""The teacher interface: messages in, completions out. Backends differ only behind this line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

Messages = list[dict]  # [{"role": "user", "content": "..."}]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    # Sampler settings servers such as llama.cpp and vLLM apply with their own defaults unless
    # told otherwise (llama.cpp: top_k 40, min_p 0.05, repeat_penalty 1.1). The values here are
    # "off"; every backend either applies them as given or refuses (see `unsupported`).
    top_k: int = 0  # 0: the whole vocabulary
    min_p: float = 0.0  # 0: no floor relative to the most likely token
    repetition_penalty: float = 1.0  # 1: none (llama.cpp's repeat_penalty, vLLM's repetition_penalty)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def unsupported(self, supported: set[str]) -> list[str]:
        """The sampler settings (beyond temperature and top_p) set away from "off" that a backend
        applying only `supported` would silently ignore."""
        off = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        return [k for k, v in off.items() if k not in supported and getattr(self, k) != v]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn) or "length"
    prompt_tokens: int
    stop_token: int | None = None  # the end-of-turn token that ended it, if any
    # Teacher top-k log-probs for each of token_ids (+ stop_token): the offline KD signal.
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)


class Teacher(Protocol):
    """Everything callers use of a teacher backend (hf.py, openai.py, vllm.py); nothing else is probed for."""

    name: str
    backend: str  # hf | openai | vllm: recorded with every record the teacher writes
    # The model's tokenizer; None only for an API teacher declared without one (the server
    # then renders prompts, and records carry no token ids).
    tokenizer: object | None
    stats: dict  # cumulative {"generated_tokens": int, "seconds": float}

    def generate(self, prompts: list[Messages], params: SamplingParams, description: str = "Generating",
                 top_k_logprobs: int = 0) -> list[list[Completion]]:
        """Return `params.n` completions for each prompt, in prompt order."""
        ...

    def generate_text(self, texts: list[str], params: SamplingParams, description: str = "Generating",
                      top_k_logprobs: int = 0) -> list[list[Completion]]:
        """The same for prompts already rendered with `tokenizer`'s chat template (needs a tokenizer)."""
        ...

    def usage_metrics(self) -> dict:
        """Request, token and cost accounting for the stage manifest; {} for a local model."""
        ...
