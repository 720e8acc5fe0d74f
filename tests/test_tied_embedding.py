"""The sparse gradient of a tied input embedding: the same dense gradient in the end, made
without a vocabulary-wide temporary; used by every single-process training run."""

from __future__ import annotations

import copy

import torch

import train_worker
from stillhouse.train import tied_embedding
from stillhouse.train.loop import Scorer, accumulate_gradients, train


def _grads(model, tok, sparse: bool):
    from accelerate import Accelerator

    model = copy.deepcopy(model)
    model.train()
    with tied_embedding.sparse_gradient(model, enabled=sparse):
        assert model.get_input_embeddings().sparse is sparse
        accumulate_gradients(Scorer(model), train_worker.examples(tok, 6), train_worker.config(batch_size=6),
                             tok.pad_token_id, Accelerator(cpu=True))
    assert model.get_input_embeddings().sparse is False
    return {n: p.grad for n, p in model.named_parameters()}


def test_the_tied_parameter_ends_with_the_same_dense_gradient(tiny):
    dense, sparse = _grads(tiny.model, tiny.tokenizer, False), _grads(tiny.model, tiny.tokenizer, True)
    emb = "model.embed_tokens.weight"
    assert sparse[emb].layout == torch.strided  # the head's dense part absorbed the sparse rows
    assert (dense[emb] != 0).any()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_uses_it_and_leaves_an_ordinary_model(tiny):
    seen = []
    model = tiny.model
    train(model, train_worker.examples(tiny.tokenizer, 4), train_worker.config(epochs=1, checkpoint_every=0),
          tiny.tokenizer.pad_token_id, on_step=lambda rec: seen.append(model.get_input_embeddings().sparse))
    assert seen and all(seen)
    assert model.get_input_embeddings().sparse is False


def test_only_a_tied_trainable_embedding_is_made_sparse(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    untied = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    with tied_embedding.sparse_gradient(untied):
        assert untied.get_input_embeddings().sparse is False  # its gradient would stay sparse: AdamW refuses
    with tied_embedding.sparse_gradient(tiny.model, enabled=False):  # data-parallel runs
        assert tiny.model.get_input_embeddings().sparse is False
    tiny.model.get_input_embeddings().weight.requires_grad_(False)  # e.g. frozen under LoRA
    with tied_embedding.sparse_gradient(tiny.model):
        assert tiny.model.get_input_embeddings().sparse is False
