"""Collects concurrent generation requests into batched `HFTeacher.generate_text` calls.

Requests that arrive close together (each within `gap_s` of the previous one, for at most
`window_s`; or while the previous batch is generating) and share their sampling parameters
go through the model together, so throughput grows with the number of concurrent clients
instead of serialising them. One batch runs at a time, in a
worker thread, so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from ..scoring import right_pad, selected_logits
from ..teachers.base import Completion, SamplingParams
from ..teachers.hf import HFTeacher, encode_prompt


@dataclass(frozen=True)
class GenKey:
    """What must be equal for two requests to share a batch."""

    params: SamplingParams
    top_logprobs: int  # -1: no logprobs; 0: chosen token only; k: plus the top k


@dataclass
class Job:
    text: str
    key: GenKey
    future: asyncio.Future


class Batcher:
    def __init__(self, teacher: HFTeacher, max_batch: int = 16, window_s: float = 0.05, gap_s: float = 0.01):
        self.teacher = teacher
        self.max_batch = max_batch
        self.window_s = window_s
        self.gap_s = gap_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.stats = {"batches": 0, "prompts": 0, "largest_batch": 0}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, texts: list[str], key: GenKey) -> list[list[Completion]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(t, key, loop.create_future()) for t in texts]
        for j in jobs:
            self.queue.put_nowait(j)
        return [await j.future for j in jobs]

    async def _loop(self) -> None:
        pending: list[Job] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
                await self._gather(pending)
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            key = pending[0].key
            batch = [j for j in pending if j.key == key][: self.max_batch]
            pending = [j for j in pending if j not in batch]
            try:
                outs = await asyncio.to_thread(self._generate, [j.text for j in batch], key)
            except Exception as e:  # a failed batch fails its requests, not the server
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            for j, o in zip(batch, outs):
                if not j.future.done():
                    j.future.set_result(o)

    async def _gather(self, pending: list[Job]) -> None:
        """Let a wave of concurrent requests join: a lone request waits only `gap_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(pending) < self.max_batch:
            wait = min(self.gap_s, deadline - loop.time())
            if wait <= 0:
                return
            try:
                pending.append(await asyncio.wait_for(self.queue.get(), wait))
            except asyncio.TimeoutError:
                return

    def _generate(self, texts: list[str], key: GenKey) -> list[list[Completion]]:
        self.stats["batches"] += 1
        self.stats["prompts"] += len(texts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(texts))
        p = key.params
        self.teacher.batch_size = max(1, len(texts)) * p.n
        k = max(1, key.top_logprobs) if key.top_logprobs >= 0 else 0
        outs = self.teacher.generate_text(texts, p, "serve", top_k_logprobs=k)
        if key.top_logprobs >= 0:
            add_chosen_logprobs(self.teacher, texts, outs)
        return outs


@torch.inference_mode()
def add_chosen_logprobs(teacher: HFTeacher, texts: list[str], outs: list[list[Completion]]) -> None:
    """Put each generated token's own log-prob in `extra["token_logprobs"]`.

    Taken from the top-k when the token is there (always, for greedy decoding); a sampled
    token outside the top-k is scored by one extra forward pass over prompt + completion.
    """
    missing: list[tuple[Completion, list[int]]] = []
    for text, comps in zip(texts, outs):
        for c in comps:
            ids = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
            lps = []
            for t, row_ids, row_lps in zip(ids, c.topk_ids or [], c.topk_logprobs or []):
                lps.append(row_lps[row_ids.index(t)] if t in row_ids else None)
            c.extra["token_logprobs"] = lps
            if any(lp is None for lp in lps):
                missing.append((c, encode_prompt(teacher.tokenizer, text) + ids))
    if not missing:
        return
    seqs = [s for _, s in missing]
    input_ids, attn = right_pad(seqs, teacher.tokenizer.pad_token_id)
    positions = torch.zeros_like(attn, dtype=torch.bool)
    for r, (c, s) in enumerate(missing):
        n = len(c.extra["token_logprobs"])
        positions[r, len(s) - n - 1 : len(s) - 1] = True  # each position predicts the next token
    logp = torch.log_softmax(selected_logits(teacher.model, input_ids, attn, positions).float(), -1)
    row = 0
    for c, s in missing:
        n = len(c.extra["token_logprobs"])
        targets = torch.tensor(s[len(s) - n :])
        c.extra["token_logprobs"] = logp[row : row + n].gather(-1, targets[:, None])[:, 0].tolist()
        row += n
