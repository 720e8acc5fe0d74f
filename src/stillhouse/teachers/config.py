"""Teacher declarations: the `teachers:` section of a recipe, one entry per named teacher.

    teachers:
      api:
        backend: openai
        base_url: http://127.0.0.1:8000/v1
        model: smollm2-135m-instruct
        api_key_env: MY_API_KEY        # the *name* of an environment variable, never the key
        terms: openai-terms
        max_concurrency: 8
        requests_per_minute: 600
        tokens_per_minute: 200000
        price: {input_per_mtok: 0.15, output_per_mtok: 0.60}
      local: {backend: hf, model: smollm2-135m-instruct}
      big: {backend: vllm, model: Qwen/Qwen2.5-7B-Instruct, tensor_parallel_size: 2}
      gguf: {backend: llamacpp, model: gemma3-270m, n_threads: 2}   # quantised, in process

Pure pydantic, no torch: recipe validation imports it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator

from ..strict import Strict

from .endpoint import has_userinfo, normalise

BACKENDS = ("hf", "openai", "vllm", "llamacpp")


class Price(Strict):
    """US dollars per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class HFTeacherConfig(Strict):
    backend: Literal["hf"]
    model: str
    batch_size: int = Field(32, gt=0)


class OpenAITeacherConfig(Strict):
    backend: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = None
    terms: str = "unknown"  # licence or terms id carried into lineage and model cards
    max_concurrency: int = Field(8, gt=0)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    price: Price = Price()
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(8, ge=0)
    cache: bool = True
    cache_dir: str | None = None  # default: $STILLHOUSE_CACHE/responses
    token_ids: bool = False  # ask for token ids (vLLM and `stillhouse serve` support it)
    tokenizer: str | None = None  # model spec of the served model's tokenizer, if known
    # "extended": send top_k, min_p and repetition_penalty too (vLLM, llama.cpp, SGLang), so the
    # server's own sampler defaults never apply; "standard": only OpenAI-spec fields (hosted APIs
    # that reject others), and settings beyond them are refused
    sampler_params: Literal["extended", "standard"] = "extended"

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"https?://[^/\s]+", v):
            raise ValueError("base_url must start with http:// or https://")
        if has_userinfo(v):  # the message never repeats the URL: it holds the credentials
            raise ValueError("base_url contains credentials (user:password@host); remove them and put the key "
                             "in an environment variable named by api_key_env")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        # the message never repeats the value: it may be a pasted key
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must name an environment variable (letters, digits, _), not hold the key itself")
        return v

    def key_fields(self) -> dict:
        """What identifies this teacher's answers (artifact ids): the endpoint (normalised, no
        userinfo), model and the sampler settings it sends, not the key or rate limits."""
        return {"backend": self.backend, "endpoint": normalise(self.base_url), "model": self.model, "terms": self.terms,
                "token_ids": self.token_ids, "tokenizer": self.tokenizer, "sampler_params": self.sampler_params}


class VLLMTeacherConfig(Strict):
    backend: Literal["vllm"]
    model: str
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    dtype: str = "auto"


class LlamaCppTeacherConfig(Strict):
    """A GGUF teacher run by llama.cpp as it is (quantised, memory-mapped): optional extra `llamacpp`."""

    backend: Literal["llamacpp"]
    model: str  # a .gguf file or a built-in GGUF model (smollm2-135m-instruct, gemma3-270m)
    n_ctx: int = Field(4096, gt=0)  # context (prompt + answer) in tokens; the KV cache is sized for it
    n_threads: int | None = Field(None, gt=0)  # default: OMP_NUM_THREADS, else every core
    n_batch: int = Field(512, gt=0)  # prompt tokens evaluated per llama.cpp decode call
    flash_attn: bool = False  # llama.cpp's fused attention (on CPU it rarely pays at short contexts)


TeacherConfig = Annotated[Union[HFTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig, LlamaCppTeacherConfig],
                          Field(discriminator="backend")]


def key_fields(cfg) -> dict:
    if isinstance(cfg, OpenAITeacherConfig):
        return cfg.key_fields()
    return {"backend": cfg.backend}  # local weights: the model's weights hash identifies it
