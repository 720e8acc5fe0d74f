"""One place that turns a teacher reference into a teacher object.

A plain model spec (or a `backend: hf` declaration) gives the in-process `HFTeacher`; a
`backend: openai` declaration an `OpenAITeacher`; `backend: vllm` a `VLLMTeacher` and
`backend: llamacpp` a `LlamaCppTeacher` (optional extras, imported only here and only when asked).
"""

from __future__ import annotations

from typing import Callable

from pydantic import TypeAdapter, ValidationError

from ..errors import StillhouseError
from ..models import ModelIdentity, load_tokenizer
from .config import HFTeacherConfig, LlamaCppTeacherConfig, OpenAITeacherConfig, TeacherConfig, VLLMTeacherConfig
from .endpoint import normalise


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
    return ModelIdentity(spec=f"openai:{cfg.model}", weights_sha256=None, license=cfg.terms, source=normalise(cfg.base_url))


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

        return OpenAITeacher.from_config(cfg, name=name, tokenizer=load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None)
    if isinstance(cfg, VLLMTeacherConfig):
        from .vllm import VLLMTeacher

        return VLLMTeacher(cfg, name=name)
    if isinstance(cfg, LlamaCppTeacherConfig):
        from .llamacpp import LlamaCppTeacher

        gguf, identity = models.gguf_source(cfg.model)
        return LlamaCppTeacher(gguf, identity, name=name, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads,
                               n_batch=cfg.n_batch, flash_attn=cfg.flash_attn)
    raise StillhouseError(f"not a teacher: {spec_or_config!r}")
