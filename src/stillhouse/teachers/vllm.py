"""The vLLM backend (optional extra `stillhouse[vllm]`): offline batched generation on GPUs.

`vllm` is imported only when a `backend: vllm` teacher is built, so a CPU install never
needs it. The parameter mapping and output conversion are plain functions, testable
without vLLM installed.
"""

from __future__ import annotations

from ..errors import StillhouseError
from .base import Completion, Messages, SamplingParams
from .tokens import end_of_turn_ids


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise StillhouseError("the vllm backend needs vLLM, which is not installed: pip install 'stillhouse[vllm]'") from None
    return vllm


def sampling_kwargs(params: SamplingParams, top_k_logprobs: int = 0) -> dict:
    """Our SamplingParams as `vllm.SamplingParams` keyword arguments."""
    kw = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
        "top_k": params.top_k,  # 0: all tokens
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }
    if top_k_logprobs > 0:
        kw["logprobs"] = top_k_logprobs  # vLLM returns the sampled token's log-prob plus the top k
    return kw


def to_completion(output, prompt_tokens: int, stop_ids: set[int], top_k: int = 0) -> Completion:
    """A vLLM `CompletionOutput` (text, token_ids, finish_reason, logprobs) as our Completion."""
    ids = list(output.token_ids)
    finish = output.finish_reason or "stop"
    stop = ids.pop() if finish == "stop" and ids and ids[-1] in stop_ids else None
    c = Completion(text=output.text, token_ids=ids, finish_reason=finish, prompt_tokens=prompt_tokens, stop_token=stop)
    if top_k > 0 and output.logprobs:
        # one {token_id: Logprob(logprob, rank, decoded_token)} per position; keep the k best
        rows = [sorted(step.items(), key=lambda kv: -kv[1].logprob)[:top_k] for step in output.logprobs]
        c.topk_ids = [[t for t, _ in row] for row in rows]
        c.topk_logprobs = [[lp.logprob for _, lp in row] for row in rows]
    return c


class VLLMTeacher:
    backend = "vllm"

    @classmethod
    def from_config(cls, cfg, name: str | None = None, loader=None) -> "VLLMTeacher":
        """The teacher a `backend: vllm` entry (config.VLLMTeacherConfig) declares (`loader` unused:
        vLLM loads the weights itself)."""
        return cls(cfg, name=name)

    def __init__(self, cfg, name: str | None = None):
        vllm = _import_vllm()
        from .. import models

        target, self._identity = models.resolve(cfg.model)
        self.name = name or self._identity.spec
        self.llm = vllm.LLM(
            model=str(target), tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
            dtype=cfg.dtype, trust_remote_code=False,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm
        self.stats = {"generated_tokens": 0, "seconds": 0.0}

    def identity(self):
        return self._identity

    def usage_metrics(self) -> dict:
        return {}  # a local engine: nothing is billed or rate-limited

    def generate(self, prompts: list[Messages], params: SamplingParams, description: str = "Generating", top_k_logprobs: int = 0):
        from .hf import render_chat

        return self.generate_text([render_chat(self.tokenizer, m) for m in prompts], params, description, top_k_logprobs)

    def generate_text(self, texts: list[str], params: SamplingParams, description: str = "Generating", top_k_logprobs: int = 0):
        import time

        start = time.perf_counter()
        sp = self._vllm.SamplingParams(**sampling_kwargs(params, top_k_logprobs))
        outs = self.llm.generate(texts, sp)
        stops = end_of_turn_ids(self.tokenizer)
        result = [[to_completion(o, len(r.prompt_token_ids), stops, top_k_logprobs) for o in r.outputs] for r in outs]
        self.stats["generated_tokens"] += sum(len(c.token_ids) for cs in result for c in cs)
        self.stats["seconds"] += time.perf_counter() - start
        return result
