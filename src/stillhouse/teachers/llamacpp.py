"""The llama.cpp backend (optional extra `stillhouse[llamacpp]`): GGUF teachers kept quantised.

The hf backend dequantises every GGUF to fp32 (a 7B Q4 teacher of ~4 GB becomes ~28 GB); here
llama.cpp runs the GGUF as it is, memory-mapped, so the teacher costs about its file size plus
the KV cache. That is the point of this backend: teachers a CPU machine could not hold otherwise.

Same interface as `HFTeacher`: `generate(messages)` / `generate_text(rendered texts)` return
`params.n` completions per prompt in prompt order, greedy or sampled (llama.cpp's own sampler,
every setting of `SamplingParams` passed explicitly, seeded per sample), with optional top-k
log-probs (temperature 1, read from the logits each token was sampled from) for the logit cache.

Prompts are rendered and tokenised by the GGUF's own tokenizer read through transformers (cached
as a small tokenizer directory), so records carry the same prompt ids and chat template as the
hf backend; llama.cpp gets those ids directly. Sequences run one at a time: llama-cpp-python's
`Llama` decodes one sequence, and the n samples of a prompt reuse its KV-cached prefix (the
prompt is evaluated once). Resumability comes from the stages' shards, as for every backend.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from ..errors import StillhouseError
from ..progress import progress
from .base import Completion, Messages, SamplingParams
from .tokens import end_of_turn_ids


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise StillhouseError("the llamacpp backend needs llama-cpp-python, which is not installed: "
                              "pip install 'stillhouse[llamacpp]'") from None
    return llama_cpp


def gguf_tokenizer(gguf: Path, digest: str):
    """The GGUF's tokenizer (and chat template) as a transformers tokenizer, cached by weights hash.

    Reading a tokenizer out of a GGUF takes seconds (a 262k vocabulary); the saved directory loads
    in well under one.
    """
    from transformers import AutoTokenizer

    from .. import models
    from ..fsutil import atomic_dir

    out = models.cache_dir() / "gguf-tokenizers" / digest[:16]
    if not (out / "tokenizer_config.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # transformers raises many types for unreadable files
            raise StillhouseError(f"cannot read the tokenizer of GGUF {gguf}: {type(e).__name__}: {e}".splitlines()[0]) from None
        with atomic_dir(out) as tmp:
            tok.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(str(out))
    models.prepare_tokenizer(tok)
    return tok


def sampler_kwargs(params: SamplingParams) -> dict:
    """Our SamplingParams as `Llama.generate` keyword arguments: every setting explicit, since
    llama-cpp-python's own defaults (top_k 40, top_p 0.95, min_p 0.05) would otherwise apply."""
    return {
        "temp": params.temperature,  # 0: greedy
        "top_k": params.top_k,  # <= 0: the whole vocabulary
        "top_p": params.top_p,
        "min_p": params.min_p,
        "typical_p": 1.0,
        "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
    }


def top_k_logprobs(logits: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The k most likely ids and their log-probs (temperature 1), most likely first."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    k = min(k, x.shape[0])
    idx = np.argpartition(-x, k - 1)[:k]
    idx = idx[np.argsort(-x[idx], kind="stable")]
    return idx.tolist(), (x[idx] - lse).tolist()


class LlamaCppTeacher:
    backend = "llamacpp"

    def __init__(self, gguf: str | Path, identity, *, name: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, n_batch: int = 512, flash_attn: bool = False):
        llama_cpp = _import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.gguf = Path(gguf)
        self._identity = identity
        self.name = name or identity.spec
        self.tokenizer = gguf_tokenizer(self.gguf, identity.weights_sha256)
        threads = n_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        with _quiet_stderr():  # llama.cpp logs every tensor at load time through C stdio
            self.llm = llama_cpp.Llama(
                model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                flash_attn=flash_attn, verbose=False,
            )
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        self._stops = end_of_turn_ids(self.tokenizer) | {self.llm.token_eos()}
        self.stats = {"generated_tokens": 0, "seconds": 0.0}

    @classmethod
    def from_config(cls, cfg, name: str | None = None, loader=None) -> "LlamaCppTeacher":
        """The teacher a `backend: llamacpp` entry (config.LlamaCppTeacherConfig) declares; the GGUF
        runs as it is (`loader`, which converts models for the hf backend, is unused)."""
        from ..models import gguf_source

        gguf, identity = gguf_source(cfg.model)
        return cls(gguf, identity, name=name, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_batch=cfg.n_batch,
                   flash_attn=cfg.flash_attn)

    def identity(self):
        return self._identity

    def usage_metrics(self) -> dict:
        return {}  # a local model: nothing is billed or rate-limited

    def _is_stop(self, tid: int) -> bool:
        return tid in self._stops or bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, tid))

    def generate(self, prompts: list[Messages], params: SamplingParams, description: str = "Generating",
                 top_k_logprobs: int = 0) -> list[list[Completion]]:
        from .hf import render_chat

        return self.generate_text([render_chat(self.tokenizer, m) for m in prompts], params, description, top_k_logprobs)

    def generate_text(self, texts: list[str], params: SamplingParams, description: str = "Generating",
                      top_k_logprobs: int = 0) -> list[list[Completion]]:
        from .hf import encode_prompt

        start, tokens_before = time.perf_counter(), self.stats["generated_tokens"]
        out = []
        with progress(description, total=len(texts)) as advance:
            for text in texts:
                ids = encode_prompt(self.tokenizer, text)
                if len(ids) + params.max_new_tokens > self.n_ctx:
                    raise StillhouseError(f"teacher '{self.name}': prompt of {len(ids)} tokens + max_new_tokens "
                                          f"{params.max_new_tokens} exceeds the llama.cpp context n_ctx={self.n_ctx}")
                # a fresh context per prompt: a prompt's answers never depend on the one before it
                # (a reused KV prefix is evaluated in other chunk sizes, so its logits differ in the
                # last bits, enough to change a sample); the n samples then share its prefix
                self.llm.reset()
                # sample i is seeded seed+i, as the openai backend seeds separate requests
                out.append([self._one(ids, params, params.seed + i, top_k_logprobs) for i in range(params.n)])
                rate = (self.stats["generated_tokens"] - tokens_before) / max(time.perf_counter() - start, 1e-9)
                advance(1, info=f"{rate:.0f} tok/s")
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def _one(self, prompt_ids: list[int], params: SamplingParams, seed: int, top_k: int) -> Completion:
        llm = self._llama_cpp
        self.llm.set_seed(seed & 0xFFFFFFFF)
        gen, topk_ids, topk_lps = [], [], []
        stopped = False
        ctx = self.llm._ctx.ctx
        n_vocab = self.llm.n_vocab()
        for tid in self.llm.generate(prompt_ids, **sampler_kwargs(params)):
            if top_k:  # the logits this token was sampled from (the generator is paused here)
                row = np.ctypeslib.as_array(llm.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                ids, lps = top_k_logprobs(row, top_k)
                topk_ids.append(ids)
                topk_lps.append(lps)
            gen.append(int(tid))
            if self._is_stop(int(tid)):
                stopped = True
                break
            if len(gen) >= params.max_new_tokens:
                break
        ids = gen[:-1] if stopped else gen
        self.stats["generated_tokens"] += len(ids)
        c = Completion(
            text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
            finish_reason="stop" if stopped else "length", prompt_tokens=len(prompt_ids),
            stop_token=gen[-1] if stopped else None,
        )
        if top_k:
            c.topk_ids, c.topk_logprobs = topk_ids, topk_lps
        return c


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level writes to stderr (fd 2) while llama.cpp loads a model."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (some embedding hosts): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
