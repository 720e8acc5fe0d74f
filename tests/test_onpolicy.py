"""On-policy distillation on tiny models: the student's reverse KL to the teacher goes down."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stillhouse import models
from stillhouse.scoring import selected_logits
from stillhouse.teachers.hf import encode_prompt, render_chat
from stillhouse.train.losses import divergence, policy_gradient
from stillhouse.train.onpolicy import OnPolicyConfig, Prompt, _batch, reverse_kl_advantages, sample_completions, train_onpolicy

from conftest import build_tiny_model, build_tokenizer

QUESTIONS = ["1+2=", "What is 7?", "say hi", "abc", "3*3", "x y z", "count", "ok?"]


def test_reverse_kl_advantage_step_is_the_reverse_kl_gradient():
    # enumerate every token x ~ q with its probability: the expected policy-gradient step
    # with advantage -(log q(x) - log p(x)) equals the gradient of KL(q || p)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 7, generator=g, requires_grad=True)
    t = torch.randn(1, 7, generator=g)
    lq = F.log_softmax(s, -1)[0]
    lp = F.log_softmax(t, -1)[0]
    q = lq.exp().detach()
    expected = sum(q[x] * policy_gradient(lq[x : x + 1], reverse_kl_advantages(lq[x : x + 1].detach(), lp[x : x + 1]))
                   for x in range(7))
    (grad_pg,) = torch.autograd.grad(expected, s)
    (grad_kl,) = torch.autograd.grad(divergence("reverse_kl", s, t), s)
    torch.testing.assert_close(grad_pg, grad_kl, rtol=1e-5, atol=1e-7)


def _setup():
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    teacher = build_tiny_model(tok, seed=0)
    student = build_tiny_model(tok, seed=1, layers=2)
    prompts = []
    for q in QUESTIONS:
        text = render_chat(tok, [{"role": "user", "content": q}])
        prompts.append(Prompt(text, encode_prompt(tok, text)))
    return tok, teacher, student, prompts


def _on_policy_reverse_kl(student, teacher, tok, prompts, cfg) -> float:
    """Exact reverse KL per position, on the student's own samples (fixed sampling seed)."""
    completions = sample_completions(student, tok, prompts, cfg, seed=12345)
    ids, attn, predict, _ = _batch(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        return divergence("reverse_kl", selected_logits(student, ids, attn, predict),
                          selected_logits(teacher, ids, attn, predict)).item()


def test_reverse_kl_policy_gradient_lowers_reverse_kl():
    tok, teacher, student, prompts = _setup()
    cfg = OnPolicyConfig(method="reverse_kl", steps=25, batch_size=8, lr=1e-2, max_new_tokens=8, seed=0)
    before = _on_policy_reverse_kl(student, teacher, tok, prompts, cfg)
    history = train_onpolicy(student, teacher, tok, prompts, cfg)
    after = _on_policy_reverse_kl(student, teacher, tok, prompts, cfg)
    assert len(history) == 25 and all(h["on_policy"] for h in history)
    assert after < 0.8 * before, (before, after)
    first = sum(h["reverse_kl"] for h in history[:5]) / 5
    last = sum(h["reverse_kl"] for h in history[-5:]) / 5
    assert last < first


def test_gkd_mixes_student_samples_and_teacher_text_and_lowers_reverse_kl():
    tok, teacher, student, prompts = _setup()
    # the off-policy share trains on the teacher's own completions
    teacher_text = sample_completions(teacher, tok, prompts, OnPolicyConfig(max_new_tokens=8), seed=7)
    prompts = [Prompt(p.text, p.ids, c) for p, c in zip(prompts, teacher_text)]
    cfg = OnPolicyConfig(method="gkd", lmbda=0.5, beta=0.5, steps=24, batch_size=8, lr=3e-3, max_new_tokens=8, seed=1)
    before = _on_policy_reverse_kl(student, teacher, tok, prompts, cfg)
    history = train_onpolicy(student, teacher, tok, prompts, cfg)
    after = _on_policy_reverse_kl(student, teacher, tok, prompts, cfg)
    n_on = sum(h["on_policy"] for h in history)
    assert 0 < n_on < len(history)  # both kinds of batch occurred
    # over training seeds 1-6 the ratio lands between 0.63 and 0.73; untrained it stays at 1
    assert after < 0.8 * before, (before, after)


def test_gkd_off_policy_needs_teacher_completions():
    import pytest

    tok, teacher, student, prompts = _setup()
    with pytest.raises(ValueError, match="teacher completion"):
        train_onpolicy(student, teacher, tok, prompts, OnPolicyConfig(method="gkd", lmbda=0.5, steps=1))
