"""The llamacpp teacher backend on the packaged SmolLM2 Q4_1 GGUF, run by llama.cpp as it is.

The same checks the hf backend passes (prompt order, n samples, greedy determinism, batching
invariance, seeded sampling, top-k log-probs, stop tokens), plus what is llama.cpp's own: every
sampler setting applied as given (top_k=1 is greedy; a repetition penalty changes the answer),
the same identity as the hf backend's converted model, and resumable shards in a recipe.
"""

from __future__ import annotations

import math

import pytest
import yaml

import llama_cpp  # noqa: E402,F401  (CI installs the extra: a missing llama_cpp fails here, never skips)

from stillhouse import models  # noqa: E402
from stillhouse.errors import StillhouseError  # noqa: E402
from stillhouse.teachers.base import SamplingParams  # noqa: E402
from stillhouse.teachers.factory import make_teacher  # noqa: E402
from stillhouse.teachers.hf import render_chat  # noqa: E402
from stillhouse.teachers.llamacpp import top_k_logprobs  # noqa: E402
from support import module_env  # noqa: E402

SMOLLM = "smollm2-135m-instruct"
QUESTIONS = ["What is 2+2?", "Name a colour.", "hi", "Count from one to five in words, please."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    with module_env(tmp_path_factory.mktemp("llamacpp"), threads=False):
        yield make_teacher({"backend": "llamacpp", "model": SMOLLM, "n_ctx": 512, "n_threads": 1})


def _texts(t, questions=QUESTIONS):
    return [render_chat(t.tokenizer, [{"role": "user", "content": q}]) for q in questions]


@pytest.mark.parametrize("n,temperature", [(1, 0.0), (3, 1.0)])
def test_completions_come_back_in_prompt_order(teacher, n, temperature):
    texts = _texts(teacher)
    lengths = [len(teacher.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts]
    before = teacher.stats["generated_tokens"]
    out = teacher.generate_text(texts, SamplingParams(max_new_tokens=8, temperature=temperature, n=n, seed=3))
    assert len(out) == len(texts)
    for comps, length in zip(out, lengths):
        assert len(comps) == n
        for c in comps:
            assert c.prompt_tokens == length
            assert c.finish_reason in ("stop", "length")
            assert (c.stop_token is not None) == (c.finish_reason == "stop")
            assert len(c.token_ids) == 8 or c.finish_reason == "stop"
            assert c.text == teacher.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert teacher.stats["generated_tokens"] - before == sum(len(c.token_ids) for cs in out for c in cs)


def test_greedy_is_deterministic_and_independent_of_the_other_prompts(teacher):
    texts = _texts(teacher)
    params = SamplingParams(max_new_tokens=10)
    together = [cs[0].token_ids for cs in teacher.generate_text(texts, params)]
    alone = [teacher.generate_text([x], params)[0][0].token_ids for x in reversed(texts)][::-1]
    assert together == alone
    assert len({tuple(x) for x in together}) == len(texts)
    # messages render through the GGUF's own chat template, as generate_text's input does
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert [cs[0].token_ids for cs in teacher.generate(msgs, params)] == together


def test_a_short_budget_stops_at_the_end_of_turn(teacher):
    out = teacher.generate_text(_texts(teacher, ["hi"]), SamplingParams(max_new_tokens=200))[0][0]
    assert out.finish_reason == "stop" and out.stop_token == teacher.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(teacher):
    texts = _texts(teacher, ["Write a word."])
    p = lambda seed: SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=seed)  # noqa: E731
    a, b, c = (teacher.generate_text(texts, p(s))[0] for s in (5, 5, 6))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a}) > 1  # the n samples differ from each other
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_every_sampler_setting_is_applied(teacher):
    texts = _texts(teacher, ["Write a long story about a cat."])
    greedy = teacher.generate_text(texts, SamplingParams(max_new_tokens=24))[0][0].token_ids
    # top_k=1 at temperature 1 leaves only the most likely token: greedy again, for any seed
    for seed in (0, 1):
        top1 = teacher.generate_text(texts, SamplingParams(max_new_tokens=24, temperature=1.0, top_k=1, seed=seed))[0][0]
        assert top1.token_ids == greedy
    # llama.cpp's own default repeat penalty is not applied unless asked for: asked for, it changes the answer
    penalised = teacher.generate_text(texts, SamplingParams(max_new_tokens=24, repetition_penalty=1.5))[0][0]
    assert penalised.token_ids != greedy


def test_top_k_logprobs_are_the_distribution_each_token_came_from(teacher):
    texts = _texts(teacher, QUESTIONS[:2])
    out = teacher.generate_text(texts, SamplingParams(max_new_tokens=6), top_k_logprobs=5)
    for comps in out:
        c = comps[0]
        steps = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
        assert len(c.topk_ids) == len(c.topk_logprobs) == len(steps)
        for tid, ids, lps in zip(steps, c.topk_ids, c.topk_logprobs):
            assert ids[0] == tid  # greedy: the chosen token is the most likely one
            assert lps == sorted(lps, reverse=True) and lps[0] <= 0
            assert sum(math.exp(x) for x in lps) <= 1 + 1e-6
    plain = teacher.generate_text(texts, SamplingParams(max_new_tokens=6))
    assert plain[0][0].topk_ids is None and plain[0][0].token_ids == out[0][0].token_ids


def test_top_k_logprobs_helper_matches_a_log_softmax():
    import numpy as np

    logits = np.array([1.0, 3.0, -2.0, 0.5, 3.0], dtype=np.float32)
    ids, lps = top_k_logprobs(logits, 3)
    ref = logits - np.log(np.exp(logits).sum())
    assert ids == [1, 4, 0] and np.allclose(lps, ref[[1, 4, 0]], atol=1e-6)
    assert np.isclose(sum(math.exp(x) for x in top_k_logprobs(logits, 5)[1]), 1.0)


def test_identity_is_the_hf_backends_and_no_conversion_happens(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path))
    ident = models.identify(SMOLLM)
    assert ident == teacher.identity() and ident.weights_sha256 and ident.license == "Apache-2.0"
    assert not (tmp_path / "converted").exists()  # hashed, never dequantised


def test_prompt_longer_than_the_context_is_one_line_error(teacher):
    with pytest.raises(StillhouseError, match="n_ctx=512"):
        teacher.generate_text(["word " * 600], SamplingParams(max_new_tokens=4))


def test_not_a_gguf_is_one_line_error(tiny_model_dir):
    with pytest.raises(StillhouseError, match="not a GGUF model"):
        make_teacher({"backend": "llamacpp", "model": str(tiny_model_dir)})


def test_missing_extra_is_named(monkeypatch):
    import sys

    from stillhouse.teachers import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(StillhouseError, match=r"stillhouse\[llamacpp\]"):
        llamacpp._import_llama_cpp()


def _recipe(tmp_path, prompts: int = 6) -> dict:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "Say the number {i} in words."}}\n' for i in range(prompts)))
    return {
        "name": "gguf",
        "teachers": {"gguf": {"backend": "llamacpp", "model": SMOLLM, "n_ctx": 512, "n_threads": 1}},
        "stages": {"answers": {"type": "complete", "teacher": "gguf", "prompts_file": str(path), "samples": 2,
                               "temperature": 0.8, "max_new_tokens": 8, "shard_size": 2, "top_k_logprobs": 3}},
    }


def test_recipe_stage_resumes_its_shards_and_records_provenance(tmp_path, monkeypatch):
    from stillhouse.api import run_recipe
    from stillhouse.records import read_rows
    from stillhouse.teachers.llamacpp import LlamaCppTeacher

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path)))
    real = LlamaCppTeacher.generate_text
    calls = []

    def crashing(self, texts, *a, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("crash in the third shard")
        return real(self, texts, *a, **kw)

    monkeypatch.setattr(LlamaCppTeacher, "generate_text", crashing)
    with pytest.raises(RuntimeError, match="third shard"):
        run_recipe(recipe, tmp_path / "ws")
    calls.clear()
    art = run_recipe(recipe, tmp_path / "ws")["answers"]
    assert calls == [2]  # only the unfinished shard ran again
    monkeypatch.setattr(LlamaCppTeacher, "generate_text", real)
    clean = run_recipe(recipe, tmp_path / "fresh")["answers"]
    rows, ref = read_rows(art.path / "data.parquet"), read_rows(clean.path / "data.parquet")
    assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in ref] and len(rows) == 12
    assert all(r["backend"] == "llamacpp" and len(r["topk_ids"]) == len(r["completion_ids"]) for r in rows)
    sampling = yaml.safe_load(rows[0]["sampling"])
    assert sampling["top_k"] == 0 and sampling["min_p"] == 0.0 and sampling["repetition_penalty"] == 1.0
    teacher = art.manifest["teachers"][0]
    assert teacher["spec"] == SMOLLM and teacher["weights_sha256"] == models.identify(SMOLLM).weights_sha256
