"""A lean batched decoding loop for the in-process teacher.

Why not `model.generate`: on CPU its per-step bookkeeping is not the cost; the cost is that a
batch keeps computing every row until the longest one ends. Here a row leaves the batch (and
its slice of the KV cache) as soon as it emits a stop token or reaches its budget, so a batch
of mixed answer lengths gets cheaper as it goes, and a large batch costs little extra.

Sampling is greedy over Gumbel-perturbed logits: an exact sample from softmax(logits / T),
much faster on CPU than a multinomial draw over a 50k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    """One row's output: generated ids up to and including its stop token (if it stopped)."""

    token_ids: list[int]
    stopped: bool
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def gumbel_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                  keyed=None) -> torch.Tensor:
    """Token ids [rows]: argmax(logits / T + Gumbel noise), after an optional top-p filter.

    `keyed` = (noise [rows, vocab], use [rows]) replaces the noise of the rows in `use` (the
    guard's distortion-free watermark); the generator is drawn from all the same, so the other
    rows' samples do not depend on it."""
    scores = logits.float() / temperature
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    u = torch.rand(scores.shape, generator=generator).clamp_(1e-20, 1.0)
    noise = -torch.log(-torch.log(u))
    if keyed is not None and keyed[0] is not None:
        noise = torch.where(keyed[1][:, None], keyed[0], noise)
    return (scores + noise).argmax(-1)


class ProcessorChain:
    """Logits processors applied in order, e.g. antidistillation and then the watermark (last, so
    it marks the distribution that is actually sampled and detection is unchanged). At most one
    may be a keyed sampler (a `gumbels` method): its noise is the chain's."""

    def __init__(self, *processors):
        keyed = [p for p in processors if getattr(p, "gumbels", None) is not None]
        if len(keyed) > 1:
            raise ValueError("a processor chain takes at most one keyed sampler")
        self.processors = processors
        if keyed:
            self.gumbels = keyed[0].gumbels

    def __call__(self, input_ids, scores):
        for p in self.processors:
            scores = p(input_ids, scores)
        return scores

    def __repr__(self) -> str:
        return f"ProcessorChain({', '.join(map(repr, self.processors))})"


def keyed_noise(processor, ids: torch.Tensor, vocab: int, streams=None, generated=None):
    """The processor's own sampling noise, if it is a keyed sampler (guard.watermark.GumbelWatermark);
    `streams` [rows]: each row's sample index among its prompt's n samples (None: all 0);
    `generated` [rows]: tokens each row has generated so far (steps still in the prompt's context are not keyed)."""
    gumbels = getattr(processor, "gumbels", None)
    return gumbels(ids, vocab, streams, generated) if gumbels is not None else None


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches top_p."""
    sorted_scores, idx = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
    drop = drop_sorted.scatter(-1, idx, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attn: torch.Tensor):
    """KV cache of every prompt token but the last (the loop feeds that one itself).

    Positions follow the left-padding rule (cumsum of the mask); only the decoder runs, so no
    LM head is computed over prompt positions.
    """
    from transformers import DynamicCache

    from ..scoring import decoder

    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)
        decoder(model)(
            input_ids=input_ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
            past_key_values=cache, use_cache=True,
        )
    return cache


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    attn: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    top_k_logprobs: int = 0,
    cache=None,
    logits_processor=None,
    sample_index: torch.Tensor | None = None,
) -> list[Decoded]:
    """Generate for a left-padded batch; `cache`, if given, holds all but the last prompt token.

    With `top_k_logprobs=k`, each row also gets the k most likely ids and their log-probs (at
    temperature 1) at every step it generated: the offline teacher signal for KD.
    `logits_processor(ids [rows, seq], logits [rows, vocab]) -> logits` (transformers'
    LogitsProcessor signature; e.g. the guard's watermark) sees each live row's tokens so far
    and changes the logits before sampling and before the top-k log-probs are taken.
    `sample_index` [rows]: which of its prompt's n samples each row is (a keyed sampler keys
    sample j with its own stream, so n samples of one prompt differ); None: all 0.
    """
    rows = input_ids.shape[0]
    if cache is None:
        cache = prefill(model, input_ids, attn)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    active = torch.arange(rows)  # original row index of each live row
    tokens = input_ids[:, -1:]
    mask = attn.clone()
    pos = mask.sum(-1, keepdim=True) - 1
    seq = input_ids if logits_processor is not None else None
    out = [Decoded([], False, [] if top_k_logprobs else None, [] if top_k_logprobs else None) for _ in range(rows)]
    for step in range(max_new_tokens):
        logits = model(
            input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        if seq is not None:
            logits = logits_processor(seq, logits)
        if temperature > 0:
            streams = sample_index[active] if sample_index is not None else None
            keyed = (keyed_noise(logits_processor, seq, logits.shape[-1], streams, torch.full((len(active),), step))
                     if seq is not None else None)
            nxt = gumbel_sample(logits, temperature, top_p, generator, keyed)
        else:
            nxt = logits.argmax(-1)
        if top_k_logprobs:
            lp, ids = torch.log_softmax(logits.float(), -1).topk(top_k_logprobs, -1)
            lp, ids = lp.tolist(), ids.tolist()
        done = torch.isin(nxt, stops)
        for j, (r, t) in enumerate(zip(active.tolist(), nxt.tolist())):
            out[r].token_ids.append(t)
            if top_k_logprobs:
                out[r].topk_ids.append(ids[j])
                out[r].topk_logprobs.append(lp[j])
        for r in active[done].tolist():
            out[r].stopped = True
        if step == max_new_tokens - 1:
            break
        keep = (~done).nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():  # finished rows leave the batch and the cache
            cache.batch_select_indices(keep)
            active, nxt, mask, pos = active[keep], nxt[keep], mask[keep], pos[keep]
            seq = seq[keep] if seq is not None else None
        tokens = nxt.unsqueeze(-1)
        if seq is not None:
            seq = torch.cat([seq, tokens], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        pos = pos + 1
    return out
