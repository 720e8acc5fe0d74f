"""Pacing requests to a remote teacher: token buckets, adaptive concurrency and retry delays.

The pieces are small and separately testable; `teachers/openai.py` combines them. Time and
randomness are injected so the maths can be checked without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import random
import time
from typing import Callable


class TokenBucket:
    """`rate_per_minute` units refill continuously up to one minute's worth (the burst).

    `acquire(n)` waits until n units are available. A request larger than the whole bucket
    is let through once the bucket is full, so an oversized request cannot block forever.
    """

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic):
        if rate_per_minute <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate_per_minute / 60.0  # units per second
        self.capacity = float(rate_per_minute)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()
        self._lock = asyncio.Lock()

    def rebind(self) -> None:
        """A fresh lock for a new event loop (asyncio locks belong to the loop that uses them)."""
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, n: float) -> float:
        """Seconds until `n` units are available (0 if now); does not take them."""
        self._refill()
        need = min(n, self.capacity) - self.level
        return max(0.0, need / self.rate)

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n  # may go negative for an oversized request: later callers wait it off

    async def acquire(self, n: float = 1.0) -> float:
        """Wait for and take `n` units; returns the seconds waited."""
        waited = 0.0
        async with self._lock:  # first come, first served
            while (delay := self.wait_time(n)) > 0:
                await asyncio.sleep(delay)
                waited += delay
            self.take(n)
        return waited


class AdaptiveLimit:
    """Concurrency limit by additive increase, multiplicative decrease (AIMD).

    A 429, a timeout or a 5xx halves the limit; so do five answers in a row much slower than
    the best seen (see `on_success`): a server slowing down under load without ever saying 429
    must not be drowned. Each success at normal latency adds 1/limit, i.e. about +1 per round
    of requests.

    Like TCP, it halves at most once per round: the requests already in flight were sent
    under the old limit, so their troubles are not counted again. The latency factor is
    generous because a batching server legitimately answers slower per request as batches
    grow and requests queue behind the batch in progress (a factor of 3 collapsed the
    concurrency to 1 against `stillhouse serve` in bench/openai_backend.py).
    """

    def __init__(self, maximum: int, minimum: int = 1, slow_factor: float = 8.0):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.limit = float(self.maximum)
        self.slow_factor = slow_factor
        self.best_latency: float | None = None  # seconds per generated token
        self._best_budget: float | None = None  # seconds per token of max_tokens
        self.in_flight = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=5)
        self.decreases = 0  # how often the limit was halved (reported by bench/openai_backend.py)
        self._cooldown = 0  # attempts to finish before the next decrease may apply
        self._cond: asyncio.Condition | None = None

    def rebind(self) -> None:
        self._cond = None
        self.in_flight = 0
        self._cooldown = 0

    @property
    def current(self) -> int:
        return max(self.minimum, int(self.limit))

    def on_success(self, latency: float, tokens: int = 1, budget: int | None = None) -> None:
        """Judge an answer's latency per generated token and per token of its budget.

        An answer is slow only if it is slow both ways: a short answer from a batching server
        waits for the longest in its batch (slow per generated token, normal per budget token),
        a long answer from a one-at-a-time server is slow per budget token only. A drowning
        server slows every answer both ways. Five slow answers in a row halve the limit.
        """
        per_tok = latency / max(1, tokens)
        per_budget = latency / max(1, budget or tokens)
        self.best_latency = per_tok if self.best_latency is None else min(self.best_latency, per_tok)
        self._best_budget = per_budget if self._best_budget is None else min(self._best_budget, per_budget)
        self._recent.append(min(per_tok / self.best_latency, per_budget / self._best_budget))
        full = len(self._recent) == self._recent.maxlen
        if full and min(self._recent) > self.slow_factor and self.in_flight > 1:
            self.decrease()
        else:
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)

    def decrease(self) -> None:
        if self._cooldown > 0:
            return
        self.limit = max(float(self.minimum), self.limit / 2)
        self.decreases += 1
        self._recent.clear()  # judge the new limit on answers sent under it
        self._cooldown = self.in_flight

    async def __aenter__(self):
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.current)
            self.in_flight += 1
        return self

    async def __aexit__(self, *exc):
        async with self._cond:
            self.in_flight -= 1
            self._cooldown = max(0, self._cooldown - 1)
            self._cond.notify_all()


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2**attempt)))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)
