"""The MMD baseline: the statistic separates distributions, and the packaged encoder loads offline."""

from __future__ import annotations

import numpy as np

from stillhouse.guard import mmd


def test_mmd_is_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8))
    same = rng.normal(size=(16, 8))
    shifted = rng.normal(loc=1.5, size=(16, 8))
    sigma = mmd.bandwidth(ref)
    assert abs(mmd.mmd2(same, ref, sigma)) < 0.05
    assert mmd.mmd2(shifted, ref, sigma) > 0.2
    assert mmd.mmd2(same[:1], ref, sigma) == 0.0  # one query is no sample


def test_packaged_encoder_embeds_offline():
    enc = mmd.load_encoder()
    v = mmd.embed(enc, ["How do I bake sourdough bread?", "What is a good recipe for sourdough?", "Prove that sqrt(2) is irrational."])
    a, b, c = v.values()
    assert a.shape == (384,) and abs(np.linalg.norm(a) - 1) < 1e-4
    assert a @ b > a @ c + 0.2


def test_embeddings_are_cached_on_disk_by_prompt_hash(tmp_path):
    class Counting:
        seen: list[str] = []

        def encode(self, texts, **kw):
            self.seen += texts
            return np.stack([np.full(4, len(t), dtype=np.float32) for t in texts])

    enc, cache = Counting(), tmp_path / "emb.safetensors"
    first = mmd.embed(enc, ["a", "bb", "a"], cache=cache)
    assert enc.seen == ["a", "bb"] and cache.exists()
    again = mmd.embed(enc, ["bb", "ccc"], cache=cache)
    assert enc.seen == ["a", "bb", "ccc"]  # only the new text was encoded
    assert (again["bb"] == first["bb"]).all() and again["ccc"][0] == 3


def test_precomputed_reference_term_gives_the_same_statistic():
    rng = np.random.default_rng(1)
    ref, x = rng.normal(size=(50, 4)), rng.normal(loc=0.5, size=(8, 4))
    sigma = mmd.bandwidth(ref)
    assert mmd.mmd2(x, ref, sigma, mmd.self_term(ref, sigma)) == mmd.mmd2(x, ref, sigma)
