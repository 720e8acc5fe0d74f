"""The training loop at scale: accumulation, data parallelism, checkpoints and resume, DPO,
bad inputs. Runs in other processes use tests/train_worker.py."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_worker
from conftest import build_tiny_model
from support import free_port, subprocess_env
from stillhouse.errors import StillhouseError
from stillhouse.train import checkpoint as ckpt
from stillhouse.train.loop import (
    Example, PreferencePair, Scorer, TrainConfig, accumulate_gradients, n_targets, plan_batches, shard, train,
)
from stillhouse.train.preference import dpo_losses, sequence_logprobs

WORKER = Path(__file__).with_name("train_worker.py")




def _grads(model, batch, cfg, pad, teacher=None):
    from accelerate import Accelerator

    m = copy.deepcopy(model)
    m.train()
    accumulate_gradients(Scorer(m), batch, cfg, pad, Accelerator(cpu=True), teacher)
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_shard_splits_a_batch_evenly_over_processes_and_passes():
    batch = list(range(8))
    ex = [Example([1] * (3 + i), 1) for i in batch]
    # 2 processes x micro 2: each gets 2 micro-batches of 2, together exactly the batch
    parts = [shard(ex, 2, 2, r) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2] and all(len(mb) == 2 for p in parts for mb in p)
    assert sorted(id(e) for p in parts for mb in p for e in mb) == sorted(id(e) for e in ex)
    # a batch smaller than the world: both processes still get one (possibly empty) micro-batch
    small = shard(ex[:1], 0, 2, 0), shard(ex[:1], 0, 2, 1)
    assert [len(s) for s in small] == [1, 1] and sum(len(s[0]) for s in small) == 1
    # uneven: 5 examples over 2 processes, micro 2 -> 2 micro-batches each, none over 2
    parts = [shard(ex[:5], 2, 2, r) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2] and max(len(mb) for p in parts for mb in p) <= 2
    assert sum(len(mb) for p in parts for mb in p) == 5


def test_plan_is_a_pure_function_of_the_seed():
    ex = [Example([1] * (3 + i % 5), 1) for i in range(10)]
    cfg = TrainConfig(epochs=2.5, batch_size=3, seed=4)
    a, b = plan_batches(ex, cfg), plan_batches(ex, cfg)
    assert [[id(e) for e in s] for s in a] == [[id(e) for e in s] for s in b]
    assert len(a) == 10  # ceil(10 / 3) = 4 per epoch x 2.5
    assert [[id(e) for e in s] for s in plan_batches(ex, TrainConfig(epochs=2.5, batch_size=3, seed=5))] != [[id(e) for e in s] for s in a]


def test_four_micro_batches_of_two_give_the_gradient_of_one_batch_of_eight(tiny):
    tok = tiny.tokenizer
    ex = train_worker.examples(tok, 8)
    assert len({n_targets(e) for e in ex}) > 2  # different target counts: per-batch means would differ
    teacher = build_tiny_model(tok, seed=5)
    cfg = TrainConfig(batch_size=8, sft_weight=0.5, kd_weight=0.5, temperature=2.0)
    whole = _grads(tiny.model, ex, cfg, tok.pad_token_id, teacher)
    accumulated = _grads(tiny.model, ex, TrainConfig(**{**cfg.to_dict(), "micro_batch_size": 2}), tok.pad_token_id, teacher)
    for name, g in whole.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=1e-6)
    # the usual mistake, averaging per-micro-batch means, gives a different gradient
    parts = [_grads(tiny.model, mb, cfg, tok.pad_token_id, teacher) for mb in shard(ex, 2, 1, 0)]
    naive = {n: sum(p[n] for p in parts) / len(parts) for n in whole}
    assert max((naive[n] - whole[n]).abs().max().item() for n in whole) > 1e-3


def test_two_process_ddp_training_matches_single_process(tmp_path, tiny):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(tmp_path / "ddp")],
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    tok = tiny.tokenizer
    model = build_tiny_model(tok, seed=0)
    single = train(model, train_worker.examples(tok), train_worker.config(), tok.pad_token_id)
    assert len(ddp) == len(single) == 9
    assert all(h["rows"] == 2 for h in ddp)  # each process really trained half of every batch
    for a, b in zip(ddp, single):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # Adam divides by sqrt(v): near-zero gradients amplify summation-order rounding, so the
    # weights agree to ~lr/10, not bit for bit
    final = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    for name, p in model.state_dict().items():
        if name in final:
            torch.testing.assert_close(final[name], p, rtol=1e-3, atol=5e-4)


def test_fsdp_on_two_cpu_processes_saves_the_whole_model_and_resumes_after_kill_9(tmp_path, tiny):
    """FSDP2 over gloo (train/fsdp.py): killed with kill -9 on both processes after step 5, resumed
    from the step-4 checkpoint (gathered full model and optimizer state); the loss curve and the
    saved weights (the checkpoint's, the final save's and `models.save`'s) match one process."""
    out = tmp_path / "fsdp"

    def launch(*args):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(WORKER), str(out), "--fsdp", *args], env=subprocess_env(), capture_output=True, text=True, timeout=600)

    killed = launch("--kill-at", "5")
    assert killed.returncode != 0 and not (out / "history.json").exists(), killed.stderr[-2000:]
    [last] = ckpt.list_checkpoints(out / "ckpt")
    assert last.name == "step-00000004"
    tok = tiny.tokenizer
    model = build_tiny_model(tok, seed=0)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    saved = load_file(str(last / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in saved.items()} == shapes  # whole tensors, not one process's shards
    resumed = launch("--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((out / "history.json").read_text())
    want = train(model, train_worker.examples(tok), train_worker.config(), tok.pad_token_id)
    assert [h["step"] for h in got] == list(range(1, 10)) and all(h["rows"] == 2 and h["fsdp"] for h in got)
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["tokens"] == b["tokens"]
    final = load_file(str(out / "final.safetensors"))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    assert set(model.state_dict()) - set(final) == ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, p in model.state_dict().items():
        if name in final:  # a tied copy is saved once, as save_pretrained does
            torch.testing.assert_close(final[name], p, rtol=1e-3, atol=5e-4)  # as DDP: Adam amplifies rounding
        torch.testing.assert_close(hf[name], p, rtol=1e-3, atol=5e-4)


def test_resume_after_kill_9_reproduces_the_uninterrupted_loss_curve(tmp_path, tiny):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(WORKER), str(out), "--kill-at", "5"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "history.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(out / "ckpt")] == ["step-00000004"]  # only the latest is kept
    resumed = subprocess.run([sys.executable, str(WORKER), str(out), "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((out / "history.json").read_text())

    tok = tiny.tokenizer
    model = build_tiny_model(tok, seed=0)
    want = train(model, train_worker.examples(tok), train_worker.config(), tok.pad_token_id)
    assert [h["step"] for h in got] == list(range(1, 10))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["tokens"] == b["tokens"]
    final = load_file(str(out / "final.safetensors"))
    for name, p in model.state_dict().items():
        if name in final:
            torch.testing.assert_close(final[name], p, rtol=1e-4, atol=1e-6)
    # the metrics file was rewritten from the checkpoint's history, then continued: no duplicates
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 10))
    assert {"loss", "sft", "kl", "lr", "tokens_per_s"} <= set(lines[0])


def test_half_written_checkpoint_is_ignored(tmp_path, tiny):
    tok = tiny.tokenizer
    cfg = train_worker.config(epochs=1)
    train(tiny.model, train_worker.examples(tok), cfg, tok.pad_token_id, checkpoint_dir=tmp_path)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good is not None and (good / "model.safetensors").is_file()
    (tmp_path / ".step-00000099.abc.partial").mkdir()  # what a kill during a write leaves
    (tmp_path / "step-00000100").mkdir()  # a directory without its state file
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_sequence_logprobs_and_dpo_loss_match_a_direct_computation():
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    logits = torch.randn(int(positions.sum()), 11)
    targets = torch.randint(0, 11, (int(positions.sum()),))
    want = torch.zeros(2)
    rows = positions.nonzero()[:, 0]
    for j in range(targets.numel()):
        want[rows[j]] += torch.log_softmax(logits[j], -1)[targets[j]]
    torch.testing.assert_close(sequence_logprobs(logits, targets, positions), want)
    losses, margin = dpo_losses(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.5)
    assert margin.item() == pytest.approx(0.5 * (1.0 - (-1.0)))
    assert losses.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())


def test_dpo_objective_prefers_the_chosen_answers(tiny):
    tok = tiny.tokenizer

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    pairs = [PreferencePair(enc(f"<|im_start|>user\nIs {i} > {i - 1}?<|im_end|>\n<|im_start|>assistant\n"),
                            enc("Yes.") + [tok.eos_token_id], enc("No way.") + [tok.eos_token_id]) for i in range(6)]
    cfg = TrainConfig(objective="dpo", dpo_beta=0.5, epochs=8, lr=5e-3, batch_size=3, micro_batch_size=2, warmup_ratio=0.0)
    h = train(tiny.model, pairs, cfg, tok.pad_token_id)
    assert len(h) == 16
    assert h[0]["margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts equal to its reference
    assert h[0]["dpo"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert h[-1]["dpo"] < 0.3 and h[-1]["reward_acc"] == 1.0 and h[-1]["margin"] > 1.0


def test_vocabulary_mismatch_for_a_same_tokenizer_loss_is_a_clear_error(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny.tokenizer
    big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2))
    ex = train_worker.examples(tok, 2)
    with pytest.raises(StillhouseError, match=r"vocabularies differ \(\d+ vs \d+ logits\)"):
        train(tiny.model, ex, TrainConfig(kd_weight=1.0), tok.pad_token_id, teacher=big)
    foreign = [Example(e.input_ids, e.n_prompt, [[len(tok) + 3]] * (len(e.input_ids) - e.n_prompt), [[0.0]] * (len(e.input_ids) - e.n_prompt)) for e in ex]
    with pytest.raises(StillhouseError, match="cache is from another tokenizer"):
        train(tiny.model, foreign, TrainConfig(kd_weight=1.0), tok.pad_token_id)


def test_empty_or_prompt_only_data_is_a_clear_error(tiny):
    with pytest.raises(StillhouseError, match="nothing to train on"):
        train(tiny.model, [], TrainConfig(kd_weight=0.0), 0)
    with pytest.raises(StillhouseError, match="nothing to train on"):
        train(tiny.model, [Example([5, 6, 7], 3)], TrainConfig(kd_weight=0.0), 0)
