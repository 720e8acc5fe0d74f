"""One place that turns a teacher reference into a teacher object.

A plain model spec (or a `backend: hf` declaration) gives the in-process `HFTeacher`; a
`backend: openai` declaration an `OpenAITeacher`; `backend: vllm` a `VLLMTeacher` and
`backend: llamacpp` a `LlamaCppTeacher` (optional extras, imported only here and only when asked).
"""

from __future__ import annotations

from typing import Callable

from pydantic import TypeAdapter, ValidationError

from ..errors import StillhouseError
from ..models import ModelIdentity
from .config import HFTeacherConfig, LlamaCppTeacherConfig, OpenAITeacherConfig, TeacherConfig, VLLMTeacherConfig


def parse_teacher_config(cfg: dict | object):
    if not isinstance(cfg, dict):
        return cfg
    try:
        return TypeAdapter(TeacherConfig).validate_python(cfg)
    except ValidationError as e:
        err = e.errors()[0]
        raise StillhouseError(f"teacher config: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def api_identity(cfg: OpenAITeacherConfig) -> ModelIdentity:
    """Lineage identity of an API teacher: its model name and terms (no weights to hash)."""
    return ModelIdentity(spec=f"openai:{cfg.model}", weights_sha256=None, license=cfg.terms, source=cfg.base_url)


def load_tokenizer(spec: str):
    """Only the tokenizer of a model spec (an API teacher needs no weights)."""
    from transformers import AutoTokenizer

    from .. import models

    target, _ = models.resolve(spec)
    tok = AutoTokenizer.from_pretrained(target)
    models.prepare_tokenizer(tok)
    return tok


def make_teacher(spec_or_config, *, name: str | None = None, loader: Callable | None = None, **overrides):
    """A teacher for a model spec string, a teacher config, or a config dict.

    `loader(spec) -> LoadedModel` lets the runner share its loaded models; `overrides` set
    backend options a stage controls (for example `batch_size` of an HF teacher).
    """
    from .. import models

    load = loader or models.load
    cfg = parse_teacher_config(spec_or_config)
    if isinstance(cfg, str):
        cfg = HFTeacherConfig(backend="hf", model=cfg)
    if isinstance(cfg, HFTeacherConfig):
        from .hf import HFTeacher

        lm = load(cfg.model)
        return HFTeacher(lm.model, lm.tokenizer, name=name or lm.identity.spec, batch_size=overrides.get("batch_size", cfg.batch_size))
    if isinstance(cfg, OpenAITeacherConfig):
        from .openai import OpenAITeacher

        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        return OpenAITeacher(
            cfg.base_url, cfg.model, name=name, api_key_env=cfg.api_key_env, terms=cfg.terms,
            max_concurrency=cfg.max_concurrency, requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute, price=cfg.price.model_dump(), cache=cfg.cache,
            cache_path=cfg.cache_dir, timeout=cfg.timeout, max_retries=cfg.max_retries,
            token_ids=cfg.token_ids, tokenizer=tokenizer, sampler_params=cfg.sampler_params,
        )
    if isinstance(cfg, VLLMTeacherConfig):
        from .vllm import VLLMTeacher

        return VLLMTeacher(cfg, name=name)
    if isinstance(cfg, LlamaCppTeacherConfig):
        from .llamacpp import LlamaCppTeacher

        gguf, identity = models.gguf_source(cfg.model)
        return LlamaCppTeacher(gguf, identity, name=name, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads,
                               n_batch=cfg.n_batch, flash_attn=cfg.flash_attn)
    raise StillhouseError(f"not a teacher: {spec_or_config!r}")
