"""Shared fixtures: a tiny random llama with a character-level tokenizer, and an isolated cache.

Nothing here touches the network or ~/.cache: every test gets its own STILLHOUSE_CACHE, and
the real packaged model (slow tests only) is converted once per session into a cache dir of
its own that the slow tests share.
"""

from __future__ import annotations

import hashlib
import os
import string
import time
from pathlib import Path

import pytest

# Never reach a hub, and keep third-party progress bars out of the test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_LAYERS = 4


def build_tokenizer():
    """A character-level BPE (no merges) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(tok, seed: int = 0, layers: int = TINY_LAYERS):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,  # larger than the default so greedy output depends on the prompt
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random llama + tokenizer (safetensors), built once per session."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_tiny_model(tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh LoadedModel of the tiny llama (cheap: tests may modify it freely)."""
    from stillhouse import models

    return models.load(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("stillhouse-cache")
    monkeypatch.setenv("STILLHOUSE_CACHE", str(cache))
    monkeypatch.setenv("STILLHOUSE_QUIET", "1")
    yield


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """One intra-op thread for the tiny-model tests: on a busy 2-core machine, two OpenMP
    threads make tiny ops 10-50x slower. Slow tests (the real model) keep the default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    from support import one_thread

    with one_thread():
        yield


# -- the real packaged teacher (slow tests) ------------------------------------------------
SMOLLM = "smollm2-135m-instruct"


def state_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def smollm_session(tmp_path_factory) -> dict:
    """Convert the packaged SmolLM2 GGUF once, into a cache dir shared by the slow tests.

    Records what the first (converting) load saw, so the model test can compare a second load.
    """
    cache = tmp_path_factory.mktemp("smollm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(cache))
        mp.setenv("STILLHOUSE_QUIET", "1")
        from stillhouse import models

        converted_before = (cache / "converted").exists()
        t0 = time.perf_counter()
        lm = models.load(SMOLLM)
        seconds = time.perf_counter() - t0
        info = {
            "cache": cache,
            "converted_before": converted_before,
            "first_load_s": seconds,
            "fingerprint": state_fingerprint(lm.model),
            "layers": lm.model.config.num_hidden_layers,
            "identity": lm.identity,
        }
        del lm
    return info


@pytest.fixture
def smollm_cache(smollm_session, monkeypatch) -> dict:
    """Point STILLHOUSE_CACHE at the session's converted-model cache for this test."""
    monkeypatch.setenv("STILLHOUSE_CACHE", str(smollm_session["cache"]))
    return smollm_session


def pytest_configure(config):
    # Also declared in pyproject.toml; registering here keeps `--strict-markers` happy if the
    # tests are run from another rootdir.
    config.addinivalue_line("markers", "slow: uses the real packaged models (seconds to minutes)")


def assert_report(art, labels=("teacher", "pruned", "distilled")) -> str:
    """A report artifact holds the comparison table for `labels`, real PNG charts and a
    self-contained HTML version; returns report.md."""
    import re

    md = art.file("report.md").read_text()
    assert "| model | pass@1" in md and "| model | params | layers |" in md
    for label in labels:
        assert re.search(rf"\| (\*\*)?{re.escape(label)}(\*\*)? \|", md), label
    for png in ("pareto.png",):
        assert f"]({png})" in md
        data = art.file(png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    html = art.file("report.html").read_text()
    assert html.count("data:image/png;base64,") == md.count("![")
    assert "<table>" in html and "http://" not in html and "https://" not in html
    return md


# -- CI honesty: under .ci/run (STILLHOUSE_NO_SKIPS=1) a skip not in tests/allowed_skips.txt fails the run
_skipped: list[tuple[str, str]] = []


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):  # a module-level importorskip skips at collection
    _note_skip(report)


def allowed_skips() -> set[str]:
    path = Path(__file__).with_name("allowed_skips.txt")
    return {line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("STILLHOUSE_NO_SKIPS") != "1":
        return
    allowed = allowed_skips()
    bad = [(node, why) for node, why in _skipped if node.split("[")[0] not in allowed]
    if bad:
        import sys

        print("\nstillhouse: skipped tests not on tests/allowed_skips.txt (install what they need):", file=sys.stderr)
        for node, why in bad:
            print(f"  {node}: {why}", file=sys.stderr)
        session.exitstatus = 1
