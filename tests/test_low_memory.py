"""low_memory training: the same updates as the ordinary loop without clipping, fewer live buffers."""

from __future__ import annotations

import pytest
import torch

import train_worker
from conftest import build_tiny_model
from stillhouse.errors import StillhouseError
from stillhouse.train import low_memory
from stillhouse.train.loop import Example, train


def _kd_examples(tok, n=12, k=4, seed=0):
    """Chats with a cached top-k teacher row per target token (random, sorted log-probs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in train_worker.examples(tok, n):
        rows = len(e.input_ids) - e.n_prompt
        ids = torch.stack([torch.randperm(len(tok), generator=g)[:k] for _ in range(rows)])
        lp = torch.log_softmax(torch.randn(rows, k + 1, generator=g), -1)[:, :k].sort(-1, descending=True).values
        out.append(Example(e.input_ids, e.n_prompt, ids.tolist(), lp.tolist()))
    return out


@pytest.mark.parametrize("objective", ["sft", "kd"])
def test_stepping_in_backward_gives_the_ordinary_loop_s_weights_and_losses(tiny, objective):
    tok = tiny.tokenizer
    ex = train_worker.examples(tok) if objective == "sft" else _kd_examples(tok)
    kw = dict(grad_clip=0.0, checkpoint_every=0, weight_decay=0.01)
    if objective == "kd":
        kw.update(sft_weight=0.3, kd_weight=0.7)
    ref_model, low_model = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=0)
    want = train(ref_model, ex, train_worker.config(**kw), tok.pad_token_id)
    got = train(low_model, ex, train_worker.config(low_memory=True, **kw), tok.pad_token_id)
    assert len(got) == len(want) == 9
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"])
    assert want[-1]["loss"] < 0.8 * want[0]["loss"]  # it trained: the comparison is not between two idle runs
    # the tied embedding (sparse lookup gradient + dense LM head gradient) moves the same way too
    for (name, p), q in zip(ref_model.named_parameters(), low_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_after_training_the_model_is_an_ordinary_model_again(tiny):
    model = tiny.model
    train(model, train_worker.examples(tiny.tokenizer, 4), train_worker.config(low_memory=True, grad_clip=0.0, epochs=1,
                                                                               checkpoint_every=0), tiny.tokenizer.pad_token_id)
    assert model.get_input_embeddings().sparse is False
    model.train()
    ids = torch.tensor([train_worker.examples(tiny.tokenizer, 1)[0].input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    # with a hook left behind, the optimizer of a finished run would step and free these
    assert all(p.grad is not None for p in model.parameters())
    assert model.get_input_embeddings().weight.grad.layout == torch.strided


def test_a_failed_run_removes_its_hooks_too(tiny):
    model = tiny.model

    def boom(rec):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        train(model, train_worker.examples(tiny.tokenizer, 4), train_worker.config(low_memory=True, grad_clip=0.0, checkpoint_every=0),
              tiny.tokenizer.pad_token_id, on_step=boom)
    ids = torch.tensor([train_worker.examples(tiny.tokenizer, 1)[0].input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.get_input_embeddings().sparse is False


@pytest.mark.parametrize(("kw", "match"), [
    (dict(grad_clip=1.0), "set grad_clip: 0"),
    (dict(grad_clip=0.0, micro_batch_size=2), "one micro-batch per step"),
])
def test_settings_it_cannot_honour_are_clear_errors(tiny, kw, match):
    before = [p.detach().clone() for p in tiny.model.parameters()]
    with pytest.raises(StillhouseError, match=match):
        train(tiny.model, train_worker.examples(tiny.tokenizer, 4), train_worker.config(low_memory=True, checkpoint_every=0, **kw),
              tiny.tokenizer.pad_token_id)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.model.parameters()))
    with pytest.raises(StillhouseError, match="low_memory: it needs one process"):
        low_memory.check(0.0, 4, 0, world=2)


def test_the_allocator_settings_take_on_glibc(tiny):
    import platform

    from stillhouse.train import allocator

    with pytest.raises(ValueError, match="allocator\n  Input should be 'reuse' or 'system'"):  # the loop's config refuses it
        train_worker.config(allocator="big")
    odd = train_worker.config().model_copy(update={"allocator": "big"})  # unvalidated: the loop still refuses it
    with pytest.raises(StillhouseError, match="unknown allocator setting 'big' \\(reuse, system\\)"):
        train(tiny.model, train_worker.examples(tiny.tokenizer, 4), odd, tiny.tokenizer.pad_token_id)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    # glibc refuses out-of-range values (mallopt returns 0): these are accepted
    assert allocator.return_freed_memory() is True
    assert allocator.keep_freed_memory() is True
