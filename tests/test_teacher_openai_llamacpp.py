"""The openai backend against a real external server: llama-cpp-python's OpenAI server
(`python -m llama_cpp.server`) on the packaged SmolLM2 Q4_1 GGUF, in a subprocess.

That server ignores `n` (one choice per request) and applies its own sampler defaults (top_k 40,
min_p 0.05, repeat_penalty 1.1) to whatever a request leaves out: the backend must ask for n
samples one by one, and send every sampler setting so the dataset's `sampling` column is what
the server applied.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

import llama_cpp.server  # noqa: F401  (CI installs the extra: a missing server fails here, never skips)

from stillhouse import models
from stillhouse.errors import StillhouseError
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.factory import make_teacher
from stillhouse.teachers.hf import render_chat
from stillhouse.teachers.openai import OpenAITeacher
from support import free_port, module_env

SMOLLM = "smollm2-135m-instruct"
PROMPT = "Write a long story about a cat and a dog."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A llama.cpp OpenAI server on a free loopback port; waits until it answers /v1/models."""
    root = tmp_path_factory.mktemp("llama-server")
    with module_env(root, threads=False):
        gguf, _ = models.gguf_source(SMOLLM)
        local = make_teacher({"backend": "llamacpp", "model": SMOLLM, "n_ctx": 1024, "n_threads": 1})
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm", "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "1", "--n_ctx", "1024"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:  # readiness, not a fixed delay: loading time depends on the machine
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, local, root
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _client(url, root, **kw) -> OpenAITeacher:
    return OpenAITeacher(url, "smollm", cache_path=root / f"responses-{time.monotonic_ns()}", tokenizer=None, **kw)


def test_greedy_answer_equals_llama_cpp_in_process_because_every_setting_is_sent(server):
    url, local, root = server
    text = render_chat(local.tokenizer, [{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_new_tokens=40)
    ours = local.generate_text([text], params)[0][0].text
    remote = _client(url, root).generate_text([text], params)[0][0]
    assert remote.text == ours
    # left to its defaults (repeat_penalty 1.1), the same server answers otherwise: sending them matters
    raw = httpx.post(f"{url}/completions", json={"model": "smollm", "prompt": text, "max_tokens": 40, "temperature": 0},
                     timeout=300).json()
    assert raw["choices"][0]["text"] != ours


def test_top_k_reaches_the_server(server):
    url, local, root = server
    msgs = [[{"role": "user", "content": PROMPT}]]
    client = _client(url, root)
    greedy = client.generate(msgs, SamplingParams(max_new_tokens=24))[0][0].text
    for seed in (1, 2):  # top_k=1 at temperature 1 leaves one candidate: the greedy answer, any seed
        assert client.generate(msgs, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=1, seed=seed))[0][0].text == greedy
    sampled = {client.generate(msgs, SamplingParams(max_new_tokens=24, temperature=1.0, seed=s))[0][0].text for s in (1, 2)}
    assert sampled != {greedy}


def test_a_server_that_ignores_n_gets_n_requests_and_a_rerun_none(server):
    url, local, root = server
    cache = root / "responses-n"
    msgs = [[{"role": "user", "content": "Name an animal."}], [{"role": "user", "content": "Name a fruit."}]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=7)
    client = OpenAITeacher(url, "smollm", cache_path=cache)
    out = client.generate(msgs, params)
    assert [len(cs) for cs in out] == [3, 3]
    assert all(len({c.text for c in cs}) > 1 for cs in out)  # distinct seeds, distinct samples
    m = client.usage_metrics()
    assert m["server_ignores_n"] and m["responses"] == 6 and m["requests"] == 6
    assert out[0][0].prompt_tokens == out[0][1].prompt_tokens > 0  # per request, not summed over the n
    again = OpenAITeacher(url, "smollm", cache_path=cache)
    assert [[c.text for c in cs] for cs in again.generate(msgs, params)] == [[c.text for c in cs] for cs in out]
    assert again.usage_metrics()["requests"] == 0


def test_standard_sampler_params_refuse_what_they_cannot_send(server):
    url, _, root = server
    client = _client(url, root, sampler_params="standard")
    with pytest.raises(StillhouseError, match="top_k, min_p cannot be sent"):
        client.generate([[{"role": "user", "content": "hi"}]], SamplingParams(top_k=5, min_p=0.1))
    assert client.usage_metrics()["requests"] == 0
    with pytest.raises(StillhouseError, match="sampler_params must be one of"):
        _client(url, root, sampler_params="all")
