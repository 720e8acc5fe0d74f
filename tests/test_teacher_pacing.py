"""Pacing pieces of the openai backend: token buckets, AIMD concurrency, backoff, Retry-After,
the response cache key, fault specs, and the vllm backend's mapping (vLLM itself not needed)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.serve.faults import parse_faults
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.cache import ResponseCache, response_key
from stillhouse.teachers.ratelimit import AdaptiveLimit, TokenBucket, backoff_delay, parse_retry_after


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_token_bucket_refills_at_its_rate():
    clock = Clock()
    b = TokenBucket(60, clock=clock)  # one unit a second, burst of 60
    assert b.wait_time(60) == 0
    b.take(60)
    assert b.wait_time(1) == pytest.approx(1.0)
    clock.t = 0.5
    assert b.wait_time(1) == pytest.approx(0.5)
    clock.t = 10
    assert b.wait_time(10) == 0 and b.wait_time(11) == pytest.approx(1.0)
    clock.t = 1000
    assert b.wait_time(60) == 0 and b.wait_time(61) == 0  # capped at the burst; oversized passes when full


def test_token_bucket_paces_real_acquires():
    async def run():
        b = TokenBucket(600)  # 10 per second, burst 600
        b.take(600)  # empty it
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(3):
            await b.acquire(1)
        return loop.time() - t0

    assert 0.25 <= asyncio.run(run()) < 1.5


def test_adaptive_limit_halves_on_trouble_and_grows_back():
    lim = AdaptiveLimit(16)
    assert lim.current == 16
    lim.decrease()
    lim.decrease()  # nothing in flight: each decrease is its own round
    assert lim.current == 4
    for _ in range(40):
        lim.on_success(latency=1.0, tokens=10)
    assert lim.current > 4
    lim.decrease()
    for _ in range(100):
        lim.decrease()
    assert lim.current == 1  # never below the minimum


def test_adaptive_limit_backs_off_when_latency_climbs_without_429():
    lim = AdaptiveLimit(16)
    lim.on_success(latency=0.5, tokens=10)  # the baseline: 0.05 s a token
    lim.on_success(latency=1.5, tokens=10)  # 3x: a batching server's normal queueing, no decrease
    assert lim.limit == 16
    lim.in_flight = 8
    for _ in range(4):
        lim.on_success(latency=5.0, tokens=10)  # answers ten times slower, but not yet five in a row
    assert lim.limit == 16
    lim.on_success(latency=6.0, tokens=10)  # the fifth: the server is drowning, halve
    assert lim.limit == 8
    lim.on_success(latency=6.0, tokens=10)  # the same round: not halved again
    assert 8 <= lim.limit < 9 and lim.decreases == 1
    lim._cooldown = 0  # the round has finished
    for _ in range(5):
        lim.on_success(latency=0.6, tokens=10)  # normal again: additive increase
    assert lim.limit > 8


def test_short_answers_held_behind_a_long_batch_do_not_halve_the_limit():
    lim = AdaptiveLimit(16)
    lim.in_flight = 16
    # a batching server answers a batch at once: per token, a 2-token answer looks 32x slower
    for tokens in (64, 2, 3, 2, 4, 3, 2, 6, 5):
        lim.on_success(latency=3.2, tokens=tokens, budget=64)
    assert lim.limit == 16 and lim.decreases == 0


def test_long_answers_from_a_one_at_a_time_server_do_not_halve_the_limit():
    lim = AdaptiveLimit(16)
    lim.in_flight = 16
    # per budget token a 60-token answer is 30x slower than a 2-token one; per token it is not
    for tokens in (2, 60, 64, 50, 60, 64, 58):
        lim.on_success(latency=0.05 * tokens, tokens=tokens, budget=64)
    assert lim.limit == 16 and lim.decreases == 0


def test_a_drowning_server_is_slow_both_ways_and_halves_the_limit():
    lim = AdaptiveLimit(16)
    lim.in_flight = 16
    lim.on_success(latency=0.5, tokens=10, budget=64)
    for _ in range(5):
        lim.on_success(latency=6.0, tokens=10, budget=64)
    assert lim.decreases == 1 and lim.limit == 8


def test_adaptive_limit_halves_once_per_round_of_errors():
    async def run():
        lim = AdaptiveLimit(16)

        async def failing():
            async with lim:
                await asyncio.sleep(0.01)
            lim.decrease()  # e.g. a 429 for each of the requests sent together

        await asyncio.gather(*(failing() for _ in range(16)))
        first_round = lim.current
        await asyncio.gather(*(failing() for _ in range(8)))
        return first_round, lim.current

    first, second = asyncio.run(run())
    assert first >= 4 and second < first  # not 16 halvings to 1 at once; still backs off round by round


def test_adaptive_limit_bounds_requests_in_flight():
    async def run():
        lim = AdaptiveLimit(3)
        peak = 0

        async def job():
            nonlocal peak
            async with lim:
                peak = max(peak, lim.in_flight)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(job() for _ in range(12)))
        return peak

    assert asyncio.run(run()) == 3


def test_backoff_is_exponential_with_full_jitter_and_capped():
    rng = random.Random(0)
    for attempt in range(10):
        d = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert 0 <= min(d) and max(d) <= min(8.0, 0.5 * 2**attempt)
        assert max(d) > 0.5 * min(8.0, 0.5 * 2**attempt)  # jitter spans the range


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_cache_key_covers_what_changes_an_answer(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    p = {"max_tokens": 8, "temperature": 0.0, "n": 1, "seed": 0}
    k = response_key("m", "chat/completions", msgs, p)
    assert k == response_key("m", "chat/completions", [{"content": "hi", "role": "user"}], dict(reversed(p.items())))
    assert k != response_key("m2", "chat/completions", msgs, p)
    assert k != response_key("m", "completions", msgs, p)
    assert k != response_key("m", "chat/completions", [{"role": "user", "content": "hi "}], p)
    for field, value in [("max_tokens", 9), ("temperature", 0.7), ("n", 2), ("seed", 1)]:
        assert k != response_key("m", "chat/completions", msgs, p | {field: value})
    cache = ResponseCache(tmp_path)
    assert cache.get(k) is None
    cache.put(k, {"choices": [1]})
    assert cache.get(k) == {"choices": [1]} and cache.count() == 1
    (tmp_path / k[:2] / f"{k}.json").write_text("{truncated")
    assert cache.get(k) is None  # a damaged entry is a miss, not a crash


def test_fault_spec_parsing_and_seeded_draws():
    f = parse_faults("429=0.25,500=0.25,slow=0.25,cut=0.25,retry_after=2,slow_s=0.5", seed=1)
    assert f.retry_after == 2 and f.slow_s == 0.5
    draws = [f.draw() for _ in range(400)]
    assert {d: draws.count(d) for d in set(draws)}.keys() == {"429", "500", "slow", "cut"}
    g = parse_faults("429=0.25,500=0.25,slow=0.25,cut=0.25", seed=1)
    assert [g.draw() for _ in range(400)] == draws  # seeded: the same faults in the same order
    assert parse_faults(None) is None
    assert parse_faults("cut=0.1").draw() in (None, "cut")
    for bad, msg in [("429", "bad entry"), ("teapot=0.1", "unknown fault 'teapot'"), ("429=0.7,500=0.7", "more than 1"), ("500=-1", "bad entry")]:
        with pytest.raises(StillhouseError, match=msg):
            parse_faults(bad)


# -- vllm backend, without vLLM --------------------------------------------------------
def test_vllm_backend_without_vllm_is_one_line_error(tiny_model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    from stillhouse.teachers.factory import make_teacher

    with pytest.raises(StillhouseError) as e:
        make_teacher({"backend": "vllm", "model": str(tiny_model_dir)})
    assert "pip install 'stillhouse[vllm]'" in str(e.value) and "\n" not in str(e.value)


def test_vllm_sampling_params_and_output_mapping():
    from stillhouse.teachers.vllm import sampling_kwargs, to_completion

    p = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, n=3, seed=5)
    assert sampling_kwargs(p) == {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 12, "seed": 5, "top_k": 0, "min_p": 0.0,
                                  "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert sampling_kwargs(p, 4)["logprobs"] == 4
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731  vLLM's Logprob record
    out = SimpleNamespace(text="ab", token_ids=[5, 6, 2], finish_reason="stop",
                          logprobs=[{5: lp(-0.1), 7: lp(-2.0), 8: lp(-3.0)}, {6: lp(-0.5), 9: lp(-0.9)}, {2: lp(-0.01)}])
    c = to_completion(out, prompt_tokens=4, stop_ids={2}, top_k=2)
    assert (c.token_ids, c.stop_token, c.finish_reason, c.prompt_tokens) == ([5, 6], 2, "stop", 4)
    assert c.topk_ids == [[5, 7], [6, 9], [2]] and c.topk_logprobs == [[-0.1, -2.0], [-0.5, -0.9], [-0.01]]
    c = to_completion(SimpleNamespace(text="x", token_ids=[5, 6], finish_reason="length", logprobs=None), 1, {2})
    assert (c.token_ids, c.stop_token, c.topk_ids) == ([5, 6], None, None)
