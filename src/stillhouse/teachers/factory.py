"""One place that turns a teacher reference into a teacher object.

A plain model spec (or a `backend: hf` declaration) gives the in-process `HFTeacher`; a
`backend: openai` declaration an `OpenAITeacher`; `backend: vllm` a `VLLMTeacher` and
`backend: llamacpp` a `LlamaCppTeacher` (optional extras, imported only here and only when asked).
Every backend class takes its own config object (teachers/config.py) through `from_config`.
"""

from __future__ import annotations

from typing import Callable

from pydantic import TypeAdapter, ValidationError

from ..errors import StillhouseError
from ..models import ModelIdentity
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


# backend name -> "module:class" under teachers/; each class builds itself from its own config
# object (`from_config`), and the optional extras are imported only when their backend is asked for
BACKEND_CLASSES = {"hf": "hf:HFTeacher", "openai": "openai:OpenAITeacher", "vllm": "vllm:VLLMTeacher",
                   "llamacpp": "llamacpp:LlamaCppTeacher"}


def make_teacher(spec_or_config, *, name: str | None = None, loader: Callable | None = None, **overrides):
    """A teacher for a model spec string, a teacher config, or a config dict.

    `loader(spec) -> LoadedModel` lets the runner share its loaded models; `overrides` set
    backend options a stage controls (for example `batch_size` of an HF teacher): those the
    backend's config declares replace its values, the others do not apply to that backend.
    """
    import importlib

    from .. import models

    cfg = parse_teacher_config(spec_or_config)
    if isinstance(cfg, str):
        cfg = HFTeacherConfig(backend="hf", model=cfg)
    if not isinstance(cfg, (HFTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig, LlamaCppTeacherConfig)):
        raise StillhouseError(f"not a teacher: {spec_or_config!r}")
    cfg = cfg.model_copy(update={k: v for k, v in overrides.items() if k in type(cfg).model_fields})
    module, cls = BACKEND_CLASSES[cfg.backend].split(":")
    backend = getattr(importlib.import_module(f"stillhouse.teachers.{module}"), cls)
    return backend.from_config(cfg, name=name, loader=loader or models.load)
