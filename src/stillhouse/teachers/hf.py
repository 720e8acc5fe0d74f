"""In-process transformers backend: batched generation with left padding and the KV cache.

Prompts are sorted by token length before batching so each batch pads only to its own
longest prompt (padding to a fixed length costs ~3x on CPU).
"""

from __future__ import annotations

import time

import torch

from ..errors import StillhouseError
from ..progress import progress
from .base import Completion, Messages, SamplingParams
from .decode import decode, prefill
from .tokens import end_of_turn_ids


def render_chat(tokenizer, messages: Messages) -> str:
    """The exact prompt text the model sees (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: plain concatenation, answer follows the last message.
    return "\n".join(m["content"] for m in messages) + "\n"


def needs_special_tokens(tokenizer, text: str) -> bool:
    """Whether encoding `text` should add the tokenizer's special tokens (its BOS).

    A rendered chat template usually starts with the BOS already; raw text for a base model
    (Gemma, Llama) does not, and those models degrade badly without it.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=needs_special_tokens(tokenizer, text))["input_ids"]


def encode_batch(tokenizer, texts: list[str], **kwargs):
    """Tokenise a padded batch with the same BOS rule as `encode_prompt` (judged on the first text)."""
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=needs_special_tokens(tokenizer, texts[0]), **kwargs)


class HFTeacher:
    backend = "hf"

    def __init__(self, model, tokenizer, name: str = "hf", batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.stats = {"generated_tokens": 0, "seconds": 0.0}
        # Applied to every decoding step's logits (decode.decode), e.g. the guard's watermark.
        self.logits_processor = None

    @classmethod
    def from_config(cls, cfg, name: str | None = None, loader=None) -> "HFTeacher":
        """The teacher a `backend: hf` entry (config.HFTeacherConfig) declares, its model loaded by
        `loader(spec) -> LoadedModel` (the runner shares its loaded models this way)."""
        from ..models import load

        lm = (loader or load)(cfg.model)
        return cls(lm.model, lm.tokenizer, name=name or lm.identity.spec, batch_size=cfg.batch_size)

    def usage_metrics(self) -> dict:
        return {}  # a local model: nothing is billed or rate-limited

    def _stop_ids(self) -> list[int]:
        ids = end_of_turn_ids(self.tokenizer)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[Messages],
        params: SamplingParams,
        description: str = "Generating",
        top_k_logprobs: int = 0,
    ) -> list[list[Completion]]:
        texts = [render_chat(self.tokenizer, m) for m in prompts]
        return self.generate_text(texts, params, description, top_k_logprobs)

    @torch.inference_mode()
    def generate_text(
        self, texts: list[str], params: SamplingParams, description: str = "Generating", top_k_logprobs: int = 0
    ) -> list[list[Completion]]:
        """Generate for already-rendered prompt texts.

        With `top_k_logprobs=k`, each completion also carries the teacher's top-k log-probs
        (at temperature 1) for every generated token and the stop token: the offline teacher
        signal for KD, obtained from the decoding pass at no extra forward cost.
        """
        refused = params.unsupported(set())  # decode.py samples from temperature and top_p only
        if refused:
            raise StillhouseError(f"teacher '{self.name}' (hf backend) does not apply {', '.join(refused)}: "
                                  "leave them off, or use the llamacpp, vllm or openai backend")
        tok = self.tokenizer
        encoded = [encode_prompt(tok, t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        stop_ids = self._stop_ids()
        pad = tok.pad_token_id
        out: list[list[Completion] | None] = [None] * len(texts)
        # Each batch holds batch_size rows, i.e. batch_size // n distinct prompts.
        per_batch = max(1, self.batch_size // max(1, params.n))
        batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
        start, tokens_before = time.perf_counter(), self.stats["generated_tokens"]
        with progress(description, total=len(texts)) as advance:
            for b, idx in enumerate(batches):
                batch = [encoded[i] for i in idx]
                width = max(len(x) for x in batch)
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
                attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
                cache = None
                if params.n > 1:
                    # n samples of a prompt are n adjacent rows; the prompt is encoded once
                    # and its KV cache copied n times, instead of n identical prefills
                    cache = prefill(self.model, input_ids, attn)
                    cache.batch_repeat_interleave(params.n)
                    input_ids = input_ids.repeat_interleave(params.n, dim=0)
                    attn = attn.repeat_interleave(params.n, dim=0)
                rows = decode(
                    self.model, input_ids, attn,
                    max_new_tokens=params.max_new_tokens, stop_ids=stop_ids,
                    temperature=params.temperature, top_p=params.top_p,
                    generator=torch.Generator().manual_seed(params.seed * 100_003 + b),
                    top_k_logprobs=top_k_logprobs, cache=cache, logits_processor=self.logits_processor,
                    sample_index=torch.arange(params.n).repeat(len(batch)) if params.n > 1 else None,
                )
                for j, i in enumerate(idx):
                    comps = []
                    for row in rows[j * params.n : (j + 1) * params.n]:
                        ids = row.token_ids[:-1] if row.stopped else row.token_ids
                        self.stats["generated_tokens"] += len(ids)
                        c = Completion(
                            text=tok.decode(ids, skip_special_tokens=True),
                            token_ids=ids,
                            finish_reason="stop" if row.stopped else "length",
                            prompt_tokens=len(encoded[i]),
                            stop_token=row.token_ids[-1] if row.stopped else None,
                        )
                        if top_k_logprobs:
                            c.topk_ids, c.topk_logprobs = row.topk_ids, row.topk_logprobs
                        comps.append(c)
                    out[i] = comps
                # this pass only: stats are cumulative over a teacher's life (every shard of a stage)
                elapsed = time.perf_counter() - start
                advance(len(idx), info=f"{(self.stats['generated_tokens'] - tokens_before) / max(elapsed, 1e-9):.0f} tok/s")
        self.stats["seconds"] += time.perf_counter() - start
        return out  # type: ignore[return-value]

