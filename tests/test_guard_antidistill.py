"""Antidistillation sampling: the processor's delta points where fine-tuning the proxy hurts its
downstream loss, its cached proxies agree with a full recompute as rows leave the batch, and bad
settings are one-line errors (also from `stillhouse serve --antidistill`)."""

from __future__ import annotations

import copy

import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.guard import antidistill as ad

DOWN = ad.Downstream(problems=6, seed=3)
STOP = 3  # a token id used as the only stop token


def _processor(tiny, lam=1.0, eps=0.05):
    from stillhouse.models import prepare_tokenizer

    prepare_tokenizer(tiny.tokenizer)
    cfg = ad.AntidistillConfig(proxy="unused", lam=lam, eps=eps, downstream=DOWN)
    return ad.build(cfg, tiny.tokenizer, proxy=copy.deepcopy(tiny.model))


def _downstream_loss(model, examples) -> float:
    with torch.no_grad():
        total = n = 0.0
        for p, a in examples:
            ids = torch.tensor([p + a])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="sum"))
            n += len(a)
    return total / n


def test_delta_ranks_tokens_by_the_harm_of_training_on_them(tiny):
    """One SGD step of the proxy on the token delta favours most raises its downstream loss more
    than a step on the token delta disfavours most (what antidistillation is for)."""
    torch.manual_seed(0)
    proc = _processor(tiny)
    examples = ad.downstream_examples(tiny.tokenizer, DOWN)
    ctx = torch.tensor([examples[0][0][:12]])
    delta = proc(ctx, torch.zeros(1, tiny.model.config.vocab_size))[0]
    losses = {}
    for name, tok in [("max", int(delta.argmax())), ("min", int(delta.argmin()))]:
        m = copy.deepcopy(tiny.model).float()
        ids = torch.cat([ctx, torch.tensor([[tok]])], -1)
        loss = torch.nn.functional.cross_entropy(m(input_ids=ids).logits[0, -2:-1].float(), ids[0, -1:])
        loss.backward()
        with torch.no_grad():
            for q in m.parameters():
                if q.grad is not None:
                    q.sub_(1e-3 * q.grad)
        losses[name] = _downstream_loss(m, examples)
    assert losses["max"] > losses["min"]
    assert torch.equal(_processor(tiny, lam=0.0)(ctx, torch.ones(1, delta.numel())), torch.ones(1, delta.numel()))


def test_cached_proxies_match_a_full_recompute_as_rows_leave(tiny):
    from stillhouse.teachers.decode import decode

    proc = _processor(tiny, lam=2.0)
    fresh = ad.AntidistillProcessor(proc.plus, proc.minus, proc.lam, proc.eps, proc.pad_id)
    pad = proc.pad_id
    checked = []

    def both(ids, scores):
        out = proc(ids, scores)
        fresh._ids = None  # forget: recompute from the whole histories
        ref = fresh(ids, scores)
        checked.append((ids.shape[0], torch.allclose(out, ref, atol=1e-3)))
        if ids.shape[0] == 3 and ids.shape[1] == width + 2:  # force row 1 to stop: it leaves the batch
            out = out.clone()
            out[1] = float("-inf")
            out[1, STOP] = 0.0
        return out

    prompts = [[1, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20]]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    decode(tiny.model, ids, attn, max_new_tokens=6, stop_ids=[STOP], temperature=1.0,
           generator=torch.Generator().manual_seed(0), logits_processor=both)
    assert [n for n, _ in checked][:4] == [3, 3, 3, 2] and all(ok for _, ok in checked), checked


def test_bad_configs_are_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "ad.yaml"
    bad.write_text("proxy: x\nlamda: 2\n")
    with pytest.raises(StillhouseError, match="lamda") as e:
        ad.load_config(bad)
    assert len(str(e.value).splitlines()) == 1
    bad.write_text("proxy: x\nlam: -1\n")
    with pytest.raises(StillhouseError, match="lam"):
        ad.load_config(bad)
    with pytest.raises(StillhouseError, match="not found"):
        ad.load_config(tmp_path / "missing.yaml")
    from stillhouse.serve import build_app

    bad.write_text(f"proxy: {tiny_model_dir}\nproxy_layers: 99\n")
    with pytest.raises(StillhouseError, match="proxy_layers 99"):
        build_app(str(tiny_model_dir), antidistill=str(bad))


def test_serve_with_antidistill(tiny_model_dir, tmp_path):
    import httpx

    from stillhouse.serve import ServerThread, build_app

    cfg = tmp_path / "ad.yaml"
    cfg.write_text(f"proxy: {tiny_model_dir}\nlam: 3.0\ndownstream: {{problems: 4}}\n")
    app = build_app(str(tiny_model_dir), antidistill=str(cfg))
    with ServerThread(app) as url:
        r = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "model": str(tiny_model_dir), "messages": [{"role": "user", "content": "say 1"}],
            "max_tokens": 12, "temperature": 1.0, "seed": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("scheme", ["greenlist", "gumbel"])
def test_serve_with_antidistill_and_a_watermark(tiny_model_dir, tmp_path, monkeypatch, scheme):
    """Both at once: answers differ from the watermark alone (the poison acts) and are still
    detected under the key (the watermark is applied last), not under another key."""
    import httpx

    from stillhouse import models
    from stillhouse.guard import watermark as wm
    from stillhouse.serve import ServerThread, build_app

    key, other = "cd" * 32, "ef" * 32
    monkeypatch.setenv("WMK", key)
    cfg = tmp_path / "ad.yaml"
    cfg.write_text(f"proxy: {tiny_model_dir}\nlam: 3.0\ndownstream: {{problems: 4}}\n")
    answers = {}
    for arm, extra in [("both", {"antidistill": str(cfg)}), ("watermark", {})]:
        app = build_app(str(tiny_model_dir), watermark_key_env="WMK", watermark_scheme=scheme, **extra)
        with ServerThread(app) as url:
            answers[arm] = [httpx.post(f"{url}/chat/completions", timeout=60, json={
                "model": str(tiny_model_dir), "messages": [{"role": "user", "content": f"say {i}"}],
                "max_tokens": 48, "temperature": 1.0, "seed": i}).json()["choices"][0]["message"]["content"]
                for i in range(6)]
    assert answers["both"] != answers["watermark"]
    tok = models.load(str(tiny_model_dir)).tokenizer
    assert wm.detect_text(key, answers["both"], tok, scheme).p_value < 1e-6
    assert wm.detect_text(other, answers["both"], tok, scheme).p_value > 1e-3


@pytest.mark.parametrize("args,message", [
    (["--antidistill", "{cfg}"], "lamda"),
    (["--watermark-key-env", "WMK", "--watermark-scheme", "kgw"], "unknown watermark scheme 'kgw'"),
    (["--watermark-key-env", "WMK_UNSET", "--antidistill", "{good}"], "WMK_UNSET"),
])
def test_serve_cli_bad_settings_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    from stillhouse.cli import main

    cfg, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    cfg.write_text("proxy: x\nlamda: 2\n")
    good.write_text("proxy: x\n")
    monkeypatch.setenv("WMK", "ab" * 32)
    args = [a.format(cfg=cfg, good=good) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tiny_model_dir), "--port", "0", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "ab" * 32 not in err
