"""Provenance without a watermark: does SUSPECT derive from PARENT? (black-box behaviour only)

The model-provenance test of Nikolic et al. (2025), in its simplest form: on probe prompts, a
model distilled, pruned or fine-tuned from PARENT keeps answering like PARENT, more than it
answers like models unrelated to PARENT. For each probe we compare the greedy answers of the
suspect with the parent's and with every reference model's (character-level similarity, so
models with different tokenizers compare), and for each reference a one-sided paired test
(Wilcoxon signed-rank over probes) asks "is the suspect closer to the parent than to this
reference?". The suspect is declared derived only if that holds against every reference: the
p-value is the largest of the per-reference p-values (an intersection-union test, valid
without any correction). Null hypothesis: the parent is, to the suspect, just one more
unrelated model.

Everything here is pure given the answers; generating them is `answers()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np

# Probes: short open prompts with many plausible answers, where models of different origin
# disagree and a derived model inherits its parent's habits. Deterministic, built in; a file
# of the user's own can replace them.
_SUBJECTS = ["the moon", "a river", "bread", "winter", "a library", "electricity", "the ocean", "a violin",
             "mountains", "a city at night", "bees", "glass", "an old map", "rain", "a clock", "coffee",
             "the desert", "a lighthouse", "snow", "a garden"]
_FORMS = ["Write one sentence about {}.", "Describe {} in a few words.", "What is special about {}?",
          "Give a short poem about {}.", "Tell me a fact about {}."]


def default_probes(n: int = 60) -> list[str]:
    probes = [form.format(s) for s in _SUBJECTS for form in _FORMS]
    order = np.random.default_rng(0).permutation(len(probes))
    return [probes[i] for i in order[:n]]


def similarity(a: str, b: str, chars: int = 80) -> float:
    """How alike two answers are, in [0, 1]: difflib's ratio on their first `chars` characters."""
    return SequenceMatcher(None, a[:chars], b[:chars], autojunk=False).ratio()


def similarities(suspect: list[str], other: list[str], chars: int = 80) -> np.ndarray:
    return np.array([similarity(a, b, chars) for a, b in zip(suspect, other, strict=True)])


@dataclass
class Verdict:
    p_value: float
    derived: bool
    alpha: float
    parent_similarity: float  # mean over probes
    reference_similarity: dict[str, float]
    reference_p: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"p_value": self.p_value, "derived": self.derived, "alpha": self.alpha,
                "parent_similarity": self.parent_similarity, "reference_similarity": self.reference_similarity,
                "reference_p": self.reference_p}


def paired_p(closer: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p for 'the differences are positive' (1.0 if all are zero)."""
    from scipy.stats import wilcoxon

    if not np.any(closer):
        return 1.0
    return float(wilcoxon(closer, alternative="greater", zero_method="zsplit").pvalue)


def test(suspect: list[str], parent: list[str], references: dict[str, list[str]], alpha: float = 0.01,
         chars: int = 80) -> Verdict:
    """The provenance test on answers to the same probes, in the same order."""
    to_parent = similarities(suspect, parent, chars)
    ref_sim, ref_p = {}, {}
    for name, answers in references.items():
        to_ref = similarities(suspect, answers, chars)
        ref_sim[name] = float(to_ref.mean())
        ref_p[name] = paired_p(to_parent - to_ref)
    p = max(ref_p.values()) if ref_p else 1.0
    return Verdict(p, p < alpha, alpha, float(to_parent.mean()), ref_sim, ref_p)


def answers(model, tokenizer, probes: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers of a loaded model to the probes (chat template if the model has one)."""
    from ..teachers.base import SamplingParams
    from ..teachers.hf import HFTeacher

    gen = HFTeacher(model, tokenizer, batch_size=batch_size)
    outs = gen.generate([[{"role": "user", "content": p}] for p in probes], SamplingParams(max_new_tokens=max_new_tokens),
                        description="Provenance probes")
    return [o[0].text for o in outs]


def lineage_says(suspect_dir, parent_spec: str) -> bool | None:
    """What the lineage graph says, if SUSPECT is a stillhouse artifact: does PARENT appear in its
    ancestry (as a teacher or as the model its weights came from)? None without a manifest."""
    from pathlib import Path

    from ..artifacts import ArtifactStore
    from ..lineage.graph import load_lineage
    from ..lineage.shares import Share, matches

    path = Path(suspect_dir)
    if not (path / "manifest.json").is_file():
        return None
    lin = load_lineage(ArtifactStore(path.parent.parent), str(path))
    return any(matches(Share(k, n, 0.0), parent_spec) for k, n in lin.nodes.items() if k != lin.root)
