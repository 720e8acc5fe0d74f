"""A frozen teacher held as GGUF-style block codes: exact on decode, smaller, same training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import train_worker
from conftest import build_tiny_model
from stillhouse.scoring import selected_logits
from stillhouse.train import compact_weights as cw
from stillhouse.train.loop import train


def gguf_roundtrip(w: torch.Tensor, qtype) -> torch.Tensor:
    """What a GGUF teacher's weight is once loaded: quantised by gguf-py, dequantised to fp32."""
    return torch.from_numpy(quants.dequantize(quants.quantize(w.detach().numpy(), qtype), qtype).copy())


def gguf_teacher(tok, seed=1):
    """A tiny llama whose linear weights went through Q4_1 and whose tied embedding through Q8_0
    (the built-in SmolLM2 teacher's layout); norms stay fp32."""
    model = build_tiny_model(tok, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(gguf_roundtrip(p, Q.Q8_0 if "embed" in name else Q.Q4_1))
    return model


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_gguf_dequantised_weights_are_recovered_bit_for_bit_in_less_memory(qtype):
    w = gguf_roundtrip(torch.randn(64, 96) * 0.05, qtype)
    packed = cw.encode(w)
    assert packed is not None
    out = packed.decode()
    assert torch.equal(out, w) and out.dtype == torch.float32
    assert np.array_equal(out.numpy().view(np.int32), w.numpy().view(np.int32))  # bit patterns too
    assert packed.nbytes() <= (0.75 if qtype == Q.Q4_1 else 1.25) * w.numel()  # vs 4 bytes a weight
    rows = torch.tensor([[5, 0], [63, 5]])
    assert torch.equal(packed.gather_rows(rows), w[rows])


@pytest.mark.parametrize("w", [torch.randn(8, 64), torch.randn(8, 64).bfloat16(), torch.randn(8, 48), torch.randn(64)])
def test_weights_without_an_exact_block_code_are_left_alone(w):
    assert cw.encode(w) is None  # real fp32, another dtype, rows not in blocks of 32, a vector


def test_a_compacted_teacher_gives_bit_identical_logits_and_keeps_one_tied_table(tiny):
    tok = tiny.tokenizer
    teacher = gguf_teacher(tok)
    ids = torch.tensor([train_worker.examples(tok, 2)[0].input_ids] * 2)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0
    pos = attn.bool()
    with torch.no_grad():
        want = selected_logits(teacher, ids, attn, pos)
        stats = cw.compact(teacher)
        got = selected_logits(teacher, ids, attn, pos)
    assert torch.equal(got, want)
    n_linear = 7 * len(teacher.model.layers)
    assert stats["layers"] == n_linear + 2  # every projection, the embedding and the tied LM head
    assert stats["bytes_after"] < stats["bytes_before"] / 3
    head, emb = teacher.get_output_embeddings(), teacher.get_input_embeddings()
    assert isinstance(head, cw.CompactLinear) and isinstance(emb, cw.CompactEmbedding)
    assert head.packed is emb.packed  # tied: one copy of the codes
    assert not any(p.ndim == 2 for p in teacher.parameters())  # no fp32 matrix left behind


def test_low_memory_online_kd_compacts_the_teacher_and_trains_as_with_the_dense_one(tiny):
    """The loss is unchanged: a dense-teacher run and a low_memory run (teacher compacted) give
    the same losses step by step."""
    tok = tiny.tokenizer
    ex = train_worker.examples(tok)
    kw = dict(grad_clip=0.0, checkpoint_every=0, sft_weight=0.3, kd_weight=0.7)
    dense_teacher, low_teacher = gguf_teacher(tok), gguf_teacher(tok)
    want = train(build_tiny_model(tok, seed=0), ex, train_worker.config(**kw), tok.pad_token_id, teacher=dense_teacher)
    got = train(build_tiny_model(tok, seed=0), ex, train_worker.config(low_memory=True, **kw), tok.pad_token_id,
                teacher=low_teacher)
    assert isinstance(low_teacher.get_output_embeddings(), cw.CompactLinear)
    assert isinstance(dense_teacher.get_output_embeddings(), torch.nn.Linear)  # only low_memory compacts
    assert want[-1]["kl"] < 0.8 * want[0]["kl"]  # it trained towards the teacher
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-6), a["step"]
