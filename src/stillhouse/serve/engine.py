"""Continuous batching: one decode loop whose batch rows join and leave between steps.

The loop runs in its own thread and owns the model. Every step feeds one token per live row
through the model with the shared KV cache (left-padded, as in `teachers/decode.py`). Between
steps, rows that finished (stop token, budget, stop string) or whose client went away leave
the batch and their slice of the cache; waiting rows are prefilled as a cohort and their cache
is left-padded to the running one's length and concatenated. So a short request issued while a
long one decodes is answered after its own few steps, not after the long one.

Requests talk to the loop through `Job`s: the loop appends tokens to a job's `Seq`s and wakes
the job's asyncio queue with the `Seq` that advanced; the HTTP side reads the `Seq` (lists only grow, so reading while the loop appends is safe under the GIL).

Sampling is per row (each row has its own temperature, top-p, logit bias, penalties and a
generator seeded from the request's seed and the choice index, so a seeded answer does not
depend on which other requests shared its batch).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import secrets
import threading
from dataclasses import dataclass, field

import torch

from ..scoring import decoder, lm_logits
from ..teachers.decode import keyed_noise
from .text import IncrementalText, find_stop, tokens_for_text


@dataclass(frozen=True)
class Sampling:
    """Everything that decides one choice's tokens (validated by the HTTP layer)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    top_logprobs: int = -1  # -1: no log-probs; 0: the chosen token's only; k: also the top k
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: never stop on the model's end token
    stop: tuple[str, ...] = ()
    track_text: bool = False  # keep the text up to date every step (streaming, stop strings)


@dataclass
class Seq:
    """One choice of one request: the row of the batch that generates it."""

    job: "Job"
    index: int
    prompt_ids: list[int]
    sampling: Sampling
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)  # generated, stop token included
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)
    text: IncrementalText | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stop_token: int | None = None
    stop_at: int = -1  # character index the text is cut at (a stop string), or -1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        """Generated ids without the stop token."""
        return self.ids[:-1] if self.stop_token is not None else self.ids


class Job:
    """One prompt's `n` choices, as the HTTP side sees them."""

    def __init__(self, loop, prompt_ids: list[int], sampling: Sampling, generators, updates: asyncio.Queue | None = None):
        self.loop = loop
        self.updates: asyncio.Queue[Seq] = updates if updates is not None else asyncio.Queue()  # may be shared by jobs
        self.seqs = [Seq(self, i, prompt_ids, sampling, g) for i, g in enumerate(generators)]
        self.error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating for this job at the next step boundary (the client went away)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.error is not None or all(s.done for s in self.seqs)

    def _notify(self, seq: Seq) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, seq)
        except RuntimeError:  # the event loop closed (server shutting down)
            pass


async def wait_all(jobs: list[Job], updates: asyncio.Queue) -> None:
    """Until every job (all sharing `updates`) has finished; a failed step raises its error."""
    while not all(j.done for j in jobs):
        await updates.get()
    for j in jobs:
        if j.error is not None:
            raise j.error


def generators_for(seed: int | None, n: int) -> list[torch.Generator]:
    """One generator per choice: choice i of a seeded request is reproducible on its own."""
    base = secrets.randbits(63) if seed is None else seed % (2**63)
    return [torch.Generator().manual_seed((base * 1_000_003 + i) % (2**63)) for i in range(n)]


class Engine:
    def __init__(self, model, tokenizer, stop_ids: list[int], *, max_batch: int = 16, pad_id: int | None = None):
        self.model = model
        self.tok = tokenizer
        self.stop_ids = sorted(set(stop_ids))
        self.max_batch = max_batch
        self.logits_processor = None  # (ids so far [rows, seq], scores) -> scores, after the sampling settings
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.stats = {"batches": 0, "prompts": 0, "largest_batch": 0, "steps": 0, "generated_tokens": 0,
                      "cancelled": 0, "running": 0, "waiting": 0}
        self._waiting: collections.deque[Seq] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # the running batch: rows, their pending token, attention mask (cache length + 1 wide), positions
        self.rows: list[Seq] = []
        self._cache = None
        self._tokens = self._mask = self._pos = None

    # -- the HTTP side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stillhouse-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], sampling: Sampling, n: int = 1, updates: asyncio.Queue | None = None) -> Job:
        """Queue a prompt's n choices (call from the event loop); `updates` may be shared by jobs."""
        job = Job(asyncio.get_running_loop(), prompt_ids, sampling, generators_for(sampling.seed, n), updates)
        if sampling.track_text:
            for s in job.seqs:
                s.text = IncrementalText(self.tok)
        with self._wake:
            self._waiting.extend(job.seqs)
            self.stats["waiting"] = len(self._waiting)
            self._wake.notify()
        return job

    def call(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the decode thread between two steps (it owns the model)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fn, fut))
            self._wake.notify()
        return fut

    def score_prompt(self, ids: list[int], top: int, chunk: int = 256):
        """Log-probs of prompt tokens 1.. (token 0 has none) and, if top > 0, the top ids/log-probs
        at each position; the LM head runs over `chunk` positions at a time, never [len, vocab] at once.
        Call through `call()`: it uses the model."""
        hidden = decoder(self.model)(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, :-1]
        lps: list[float] = []
        tids: list[list[int]] = []
        tlps: list[list[float]] = []
        for a in range(0, hidden.shape[0], chunk):
            logp = torch.log_softmax(lm_logits(self.model, hidden[a : a + chunk]).float(), -1)
            target = torch.tensor(ids[a + 1 : a + 1 + chunk])
            lps += logp.gather(-1, target[:, None])[:, 0].tolist()
            if top > 0:
                v, i = logp.topk(top, -1)
                tids += i.tolist()
                tlps += v.tolist()
            else:
                tids += [[] for _ in range(len(target))]
                tlps += [[] for _ in range(len(target))]
        return lps, tids, tlps

    # -- the decode thread -----------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self.rows and not self._waiting and not self._calls:
                    self._wake.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), collections.deque()
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # a failed step fails its requests, not the server
                for s in self.rows:
                    s.job.error = e
                    s.job._notify(s)
                self.rows, self._cache = [], None
            self.stats["running"] = len(self.rows)

    def _admit(self) -> None:
        new: list[Seq] = []
        with self._wake:
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                s = self._waiting.popleft()
                if s.job.cancelled:
                    self._finish(s, "cancelled")
                    continue
                if s.index == 0:
                    self.stats["prompts"] += 1
                new.append(s)
            self.stats["waiting"] = len(self._waiting)
        if not new:
            return
        self.stats["batches"] += 1
        cache, tokens, mask, pos = self._prefill(new)
        if not self.rows:
            self.rows, self._cache, self._tokens, self._mask, self._pos = new, cache, tokens, mask, pos
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            _merge_cache(self._cache, cache, len(new), width - 1)
            self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
            self._tokens = torch.cat([self._tokens, tokens])
            self._pos = torch.cat([self._pos, pos])
            self.rows = self.rows + new
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.rows))

    def _prefill(self, seqs: list[Seq]):
        """KV cache of all but the last prompt token of each row; identical prompts are run once."""
        from transformers import DynamicCache

        unique: dict[tuple[int, ...], int] = {}
        for s in seqs:
            unique.setdefault(tuple(s.prompt_ids), len(unique))
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        cache = DynamicCache()
        if width > 1:
            pos = (attn.cumsum(-1) - 1).clamp_(min=0)
            decoder(self.model)(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                                past_key_values=cache, use_cache=True)
        rows = torch.tensor([unique[tuple(s.prompt_ids)] for s in seqs])
        if len(rows) != len(prompts) or not torch.equal(rows, torch.arange(len(prompts))):
            cache.batch_select_indices(rows)
        ids, attn = ids[rows], attn[rows]
        return cache, ids[:, -1:], attn, attn.sum(-1, keepdim=True) - 1

    def _step(self) -> None:
        logits = self.model(
            input_ids=self._tokens, attention_mask=self._mask, position_ids=self._pos, past_key_values=self._cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1].float()
        self.stats["steps"] += 1
        rows = self.rows
        want_lp = any(s.sampling.top_logprobs >= 0 for s in rows)
        logp = torch.log_softmax(logits, -1) if want_lp else None
        scores = self._processed(logits, rows)
        keyed = None
        if self.logits_processor is not None:  # e.g. the guard's watermark; served log-probs stay the model's own
            hist = _histories(rows, self.pad_id)
            scores = self.logits_processor(hist, scores)
            if any(s.sampling.temperature > 0 for s in rows):
                keyed = keyed_noise(self.logits_processor, hist, scores.shape[-1], [s.index for s in rows],
                                    [len(s.ids) for s in rows])
        nxt = scores.argmax(-1)
        for r, s in enumerate(rows):
            if s.sampling.temperature > 0:
                row_keyed = None if keyed is None or keyed[0] is None else (keyed[0][r:r + 1], keyed[1][r:r + 1])
                nxt[r] = _gumbel(scores[r], s.sampling.temperature, s.sampling.top_p, s.generator, row_keyed)
        k = max((s.sampling.top_logprobs for s in rows), default=0)
        top_lp = top_ids = None
        if k > 0:
            top_lp, top_ids = logp.topk(k, -1)
            top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist() if want_lp else None
        keep = []
        for r, (s, t) in enumerate(zip(rows, nxt.tolist())):
            if s.job.cancelled:
                self._finish(s, "cancelled")
                continue
            s.ids.append(t)
            if s.sampling.top_logprobs >= 0:
                s.logprobs.append(chosen[r])
                kk = s.sampling.top_logprobs
                if kk > 0:
                    s.topk_ids.append(top_ids[r][:kk])
                    s.topk_logprobs.append(top_lp[r][:kk])
            self.stats["generated_tokens"] += 1
            if t in self.stop_ids and not s.sampling.ignore_eos:
                s.stop_token = t
                self._finish(s, "stop")
            elif s.text is not None and self._hit_stop_string(s):
                self._finish(s, "stop")
            elif len(s.ids) >= s.sampling.max_new_tokens:
                self._finish(s, "length")
            else:
                keep.append(r)
                s.job._notify(s)
        self._shrink(keep, nxt)

    def _processed(self, logits: torch.Tensor, rows: list[Seq]) -> torch.Tensor:
        """Logits after each row's logit bias, penalties and end-token ban (copied only if needed)."""
        out = logits
        for r, s in enumerate(rows):
            p = s.sampling
            if not (p.logit_bias or p.presence_penalty or p.frequency_penalty or p.ignore_eos):
                continue
            if out is logits:
                out = logits.clone()
            for tid, b in p.logit_bias:
                out[r, tid] += b
            if (p.presence_penalty or p.frequency_penalty) and s.ids:
                counts = torch.bincount(torch.tensor(s.ids), minlength=out.shape[1])[: out.shape[1]].float()
                out[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if p.ignore_eos:
                out[r, self.stop_ids] = float("-inf")
        return out

    def _hit_stop_string(self, s: Seq) -> bool:
        before = len(s.text.text)
        s.text.add(s.ids)
        if not s.sampling.stop:
            return False
        longest = max(len(x) for x in s.sampling.stop)
        at = find_stop(s.text.text, list(s.sampling.stop), max(0, before - longest + 1))
        if at < 0:
            return False
        s.stop_at = at
        # keep the tokens up to the one that completed the stop string
        n = tokens_for_text(self.tok, s.ids, at)
        del s.ids[n:], s.logprobs[n:], s.topk_ids[n:], s.topk_logprobs[n:]
        return True

    def _finish(self, s: Seq, reason: str) -> None:
        s.finish_reason = reason
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        s.job._notify(s)

    def _shrink(self, keep: list[int], nxt: torch.Tensor) -> None:
        """Drop finished rows, append the step's column, trim padding no row needs any more."""
        if len(keep) < len(self.rows):
            if not keep:
                self.rows, self._cache = [], None
                return
            idx = torch.tensor(keep)
            self._cache.batch_select_indices(idx)
            self.rows = [self.rows[i] for i in keep]
            nxt, self._mask, self._pos = nxt[idx], self._mask[idx], self._pos[idx]
        self._tokens = nxt[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=-1)
        self._pos = self._pos + 1
        first = int(self._mask.any(0).int().argmax())  # leading columns that are padding in every row
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                if layer.keys is not None and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _gumbel(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, keyed=None) -> int:
    from ..teachers.decode import gumbel_sample

    return int(gumbel_sample(scores[None], temperature, top_p, generator, keyed)[0])


def _histories(rows: list[Seq], pad: int) -> torch.Tensor:
    """[rows, longest] prompt + generated ids of each row, left-padded with `pad` (a logits
    processor's input_ids, as the decode loop gives them)."""
    hist = [s.prompt_ids + s.ids for s in rows]
    width = max(len(h) for h in hist)
    return torch.tensor([[pad] * (width - len(h)) + h for h in hist])


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0)) if t.shape[1] < width else t


def _merge_cache(run, new, new_rows: int, length: int) -> None:
    """Append `new`'s rows to `run` (in place), both left-padded with zeros to `length` columns.

    Padded columns are masked out by the attention mask, so their zeros are never attended.
    A cache that never ran (one-token prompts) has no layers yet: it is all padding.
    """
    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0)) if t.shape[2] < length else t

    for i, layer in enumerate(run.layers):  # every running layer holds keys: the batch has stepped
        other = new.layers[i] if i < len(new.layers) else None
        if other is not None and other.keys is not None and other.keys.numel():
            kb, vb = other.keys, other.values
        else:
            kb = vb = layer.keys.new_zeros(new_rows, layer.keys.shape[1], 0, layer.keys.shape[3])
        layer.keys = torch.cat([pad(layer.keys), pad(kb)])
        layer.values = torch.cat([pad(layer.values), pad(vb)])
