"""Fuzz `stillhouse serve` with schemathesis from its own OpenAPI schema: no request body, valid
or not, may produce a server error. Bounded (a fixed number of derandomised cases per mode, a
64-token context so every valid request is cheap) to stay well under a minute in CI."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serve_support import serving, stats

CASES = 100  # per generation mode; the docs quote this figure


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    with serving(tiny_model_dir, tmp_path_factory, max_context=64, default_max_tokens=16) as (url, _):
        yield url


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(fuzz_server, mode):
    root = fuzz_server.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
    ops = {op.ok().path for op in schema.get_all_operations()}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/stillhouse/stats"} <= ops
    statuses: dict[int, int] = {}

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # the served name: otherwise nearly every case stops at a 404
        response = case.call_and_validate(base_url=root, checks=[not_a_server_error], timeout=600)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    print(f"schemathesis {mode.value}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= CASES // 2 and not any(s >= 500 for s in statuses)
    if mode == GenerationMode.POSITIVE:
        assert statuses.get(200, 0) > 0  # the fuzzer got past validation, not only refusals
    assert stats(fuzz_server)["running"] == 0
