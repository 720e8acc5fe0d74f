"""Seeded fault injection for `stillhouse serve`: the failures a remote teacher really shows.

A spec such as `429=0.1,500=0.1,slow=0.05,cut=0.05` gives the fraction of generation requests
answered with HTTP 429 (with Retry-After), HTTP 500, a slow answer, or a connection dropped
mid-response. Optional `retry_after=<s>` and `slow_s=<s>` tune the first and third.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from ..errors import StillhouseError

KINDS = ("429", "500", "slow", "cut")


@dataclass
class Faults:
    rates: dict[str, float]
    retry_after: float = 1.0
    slow_s: float = 2.0
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """The fault for the next request, or None for a normal answer."""
        with self._lock:
            u = self._rng.random()
        acc = 0.0
        for kind in KINDS:
            acc += self.rates.get(kind, 0.0)
            if u < acc:
                return kind
        return None


def parse_faults(spec: str | None, seed: int = 0) -> Faults | None:
    if not spec:
        return None
    rates: dict[str, float] = {}
    opts: dict[str, float] = {}
    for part in spec.split(","):
        k, sep, v = part.strip().partition("=")
        try:
            value = float(v)
        except ValueError:
            value = None
        if not sep or value is None or value < 0:
            raise StillhouseError(f"--faults: bad entry '{part.strip()}' (expected KIND=NUMBER, e.g. 429=0.1)")
        if k in KINDS:
            rates[k] = value
        elif k in ("retry_after", "slow_s"):
            opts[k] = value
        else:
            raise StillhouseError(f"--faults: unknown fault '{k}' (known: {', '.join(KINDS)}, retry_after, slow_s)")
    if sum(rates.values()) > 1:
        raise StillhouseError(f"--faults: rates add up to {sum(rates.values()):.2f}, more than 1")
    return Faults(rates, seed=seed, **opts)
