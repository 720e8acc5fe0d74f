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

Five statistics (STATISTICS) measure "answers like" per probe:
- `agreement` (black box: the suspect's answers only): character similarity of the suspect's
  greedy answer to the parent's and to each reference's.
- `likelihood` (the suspect's weights, or an API that scores given text): the suspect's
  log-likelihood per character of the parent's answer and of each reference's answer to that
  probe. A derivative keeps its parent's distribution even where its greedy answers drifted
  (a LoRA on other data answers tersely but still finds its parent's sentences likely).
- `likelihood-reverse` (the suspect's answers only: an API that returns text is enough): the
  parent and every reference score the *suspect's* answers; a derivative writes text its parent
  finds likelier than unrelated models do. It finds the lineage a model's weights came from
  even after it was trained on another model's text, where `likelihood` finds the text's.
- `likelihood-both` (the default): both directions, the smaller p doubled (Bonferroni over the
  two tests). Chosen on the seen real pairs (docs/provenance.md), before the fresh ones were scored.
- `likelihood-zlib`: repetitive text (echoing the prompt, looping) is likely under any model,
  so each text's conditional zlib size (nats per character) is added back: the score is how
  much better than a compressor the suspect predicts it. The added term does not depend on the
  suspect, so it shifts every suspect towards the lineage whose answers compress worst: at real
  scale it called three Gemma models derived from SmolLM2 (docs/provenance.md). Not the default.

Everything here is pure given the answers and scores; generating them is `answers()` and
`loglik()`.
"""

from __future__ import annotations

import math
import zlib
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


def zlib_nats(probe: str, text: str) -> float:
    """A model-free estimate of how predictable a text is as the answer to a probe: the extra
    zlib-compressed size (nats per character) of the text after the probe. Repeating itself or
    the prompt costs a compressor little, as it costs any language model little. NaN if empty."""
    if not text:
        return math.nan
    head = (probe + "\n").encode()
    extra = len(zlib.compress(head + text.encode(), 9)) - len(zlib.compress(head, 9))
    return 8 * math.log(2) * extra / len(text)


def calibrated(logliks: np.ndarray, probes: list[str], texts: list[str], chars: int = 80) -> np.ndarray:
    """Per-character log-likelihoods (from `loglik`) plus each text's `zlib_nats`: how much better
    than a compressor the model predicts the text."""
    return np.asarray(logliks, dtype=float) + np.array([zlib_nats(p, t[:chars]) for p, t in zip(probes, texts, strict=True)])


# agreement: the suspect's answers only; likelihood: the suspect scores the others' answers (raw
# per-character log-likelihood, or calibrated by zlib); reverse: the others score the suspect's
STATISTICS = ("agreement", "likelihood", "likelihood-zlib", "likelihood-reverse", "likelihood-both")
SCORED_BY_SUSPECT = {"likelihood", "likelihood-zlib", "likelihood-both"}  # the suspect's weights score the others' answers
SCORED_BY_OTHERS = {"likelihood-reverse", "likelihood-both"}  # the parent and references score the suspect's answers
NEEDS_SUSPECT_ANSWERS = {"agreement"} | SCORED_BY_OTHERS


@dataclass
class Verdict:
    p_value: float
    derived: bool
    alpha: float
    parent_similarity: float  # mean over probes (of the statistic's per-probe score)
    reference_similarity: dict[str, float]
    reference_p: dict[str, float] = field(default_factory=dict)
    statistic: str = "agreement"
    parts: dict[str, float] = field(default_factory=dict)  # likelihood-both: each direction's p

    def to_dict(self) -> dict:
        def num(x):  # NaN (nothing to compare) is null in JSON
            return None if isinstance(x, float) and math.isnan(x) else x

        return {"statistic": self.statistic, "p_value": self.p_value, "derived": self.derived, "alpha": self.alpha,
                "parent_similarity": num(self.parent_similarity),
                "reference_similarity": {k: num(v) for k, v in self.reference_similarity.items()},
                "reference_p": {k: num(v) for k, v in self.reference_p.items()},
                **({"parts": self.parts} if self.parts else {})}


def paired_p(closer: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p for 'the differences are positive' (1.0 if all are zero)."""
    from scipy.stats import wilcoxon

    if not np.any(closer):
        return 1.0
    return float(wilcoxon(closer, alternative="greater", zero_method="zsplit").pvalue)


def closer_test(to_parent: np.ndarray, to_refs: dict[str, np.ndarray], alpha: float = 0.01,
                statistic: str = "agreement", min_probes: int = 5) -> Verdict:
    """The intersection-union test on per-probe scores (higher: the suspect is closer): the
    suspect must be closer to the parent than to every reference. Probes where a score is NaN
    (an empty answer has no likelihood) drop out of that comparison; a reference left with
    fewer than `min_probes` (it answered nothing) cannot be compared and is left out (p NaN)."""
    to_parent = np.asarray(to_parent, dtype=float)
    ref_sim, ref_p = {}, {}
    for name, to_ref in to_refs.items():
        to_ref = np.asarray(to_ref, dtype=float)
        d = to_parent - to_ref
        d = d[np.isfinite(d)]
        ref_sim[name] = float(np.nanmean(to_ref)) if np.isfinite(to_ref).any() else math.nan
        ref_p[name] = paired_p(d) if len(d) >= min_probes else math.nan
    compared = [q for q in ref_p.values() if not math.isnan(q)]
    p = max(compared) if compared else 1.0
    mean_parent = float(np.nanmean(to_parent)) if np.isfinite(to_parent).any() else math.nan
    return Verdict(p, p < alpha, alpha, mean_parent, ref_sim, ref_p, statistic)


def test(suspect: list[str], parent: list[str], references: dict[str, list[str]], alpha: float = 0.01,
         chars: int = 80) -> Verdict:
    """The agreement test on the suspect's answers to the same probes, in the same order."""
    return closer_test(similarities(suspect, parent, chars),
                       {name: similarities(suspect, answers, chars) for name, answers in references.items()}, alpha)


def test_likelihood(parent: np.ndarray, references: dict[str, np.ndarray], alpha: float = 0.01,
                    calibrate: tuple[list[str], list[str], dict[str, list[str]], int] | None = None) -> Verdict:
    """The likelihood test on the suspect's `loglik` of the parent's answers and of each
    reference's, to the same probes in the same order. `calibrate` = (probes, parent answers,
    reference answers, chars) adds each text's zlib_nats (the calibrated statistic)."""
    if calibrate is None:
        return closer_test(parent, references, alpha, "likelihood")
    probes, p_texts, r_texts, chars = calibrate
    return closer_test(calibrated(parent, probes, p_texts, chars),
                       {n: calibrated(r, probes, r_texts[n], chars) for n, r in references.items()}, alpha, "likelihood-zlib")


def both_ways(forward: Verdict, reverse: Verdict, alpha: float = 0.01) -> Verdict:
    """`likelihood-both`: derived if either direction is, at alpha over the pair of tests
    (p = 2 x the smaller p, capped at 1). Scores and per-reference p-values are the forward test's."""
    p = min(1.0, 2 * min(forward.p_value, reverse.p_value))
    return Verdict(p, p < alpha, alpha, forward.parent_similarity, forward.reference_similarity, forward.reference_p,
                   "likelihood-both", {"likelihood": forward.p_value, "likelihood-reverse": reverse.p_value})


def answers(model, tokenizer, probes: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers of a loaded model to the probes (chat template if the model has one)."""
    from ..teachers.base import SamplingParams
    from ..teachers.hf import HFTeacher

    gen = HFTeacher(model, tokenizer, batch_size=batch_size)
    outs = gen.generate([[{"role": "user", "content": p}] for p in probes], SamplingParams(max_new_tokens=max_new_tokens),
                        description="Provenance probes")
    return [o[0].text for o in outs]


def loglik(model, tokenizer, probes: list[str], texts: list[str], chars: int = 80, batch_size: int = 16) -> np.ndarray:
    """Log-likelihood per character (nats) the model gives each text, cut to `chars` characters,
    as its answer to the probe (chat template if it has one). The text is tokenised with the
    model's own tokenizer, so any model scores any model's answers. NaN for an empty text."""
    import torch

    from ..progress import progress
    from ..scoring import selected_logits
    from ..teachers.hf import encode_prompt, render_chat
    from ..train.loop import Example, collate
    from ..train.preference import sequence_logprobs

    out = np.full(len(texts), math.nan)
    rows = []  # (index, the probe's prompt + the answer's tokens) for every non-empty answer
    for i, (probe, text) in enumerate(zip(probes, texts, strict=True)):
        ans = tokenizer(text[:chars], add_special_tokens=False)["input_ids"] if text[:chars] else []
        if ans:
            prompt = encode_prompt(tokenizer, render_chat(tokenizer, [{"role": "user", "content": probe}]))
            rows.append((i, Example(prompt + ans, len(prompt))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    with torch.no_grad(), progress("Provenance likelihoods", total=len(rows)) as advance:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            ids, attn, predict, targets, _ = collate([e for _, e in chunk], pad)
            predict = predict.to(device)
            sums = sequence_logprobs(selected_logits(model, ids.to(device), attn.to(device), predict), targets.to(device), predict)
            for (i, _), total in zip(chunk, sums.tolist()):
                out[i] = total / len(texts[i][:chars])
            advance(len(chunk))
    return out


def decide(statistic: str, answers_of: dict[str, list[str]], parent: str, references: list[str], alpha: float = 0.01,
           chars: int = 80, *, suspect_answers: list[str] | None = None, logliks: dict | None = None,
           scored_by: dict | None = None, probes: list[str] | None = None) -> Verdict:
    """The test by statistic name. `answers_of` holds the parent's and every reference's answers;
    `agreement` needs the suspect's answers; `likelihood` and `likelihood-zlib` the suspect's
    `loglik` of each of those (`logliks`, keyed like `answers_of`; zlib also the probes);
    `likelihood-reverse` the parent's and every reference's `loglik` of the suspect's answers
    (`scored_by`, keyed the same); `likelihood-both` both."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if statistic == "agreement":
        return test(suspect_answers, answers_of[parent], {r: answers_of[r] for r in references}, alpha, chars)
    forward = reverse = None
    if statistic in SCORED_BY_SUSPECT:
        calibrate = (probes, answers_of[parent], {r: answers_of[r] for r in references}, chars) if statistic == "likelihood-zlib" else None
        forward = test_likelihood(logliks[parent], {r: logliks[r] for r in references}, alpha, calibrate)
    if statistic in SCORED_BY_OTHERS:
        reverse = closer_test(scored_by[parent], {r: scored_by[r] for r in references}, alpha, "likelihood-reverse")
    return both_ways(forward, reverse, alpha) if forward and reverse else forward or reverse


def run(load, suspect: str | None, parent: str, references: list[str], probes: list[str], statistic: str = "likelihood-both",
        alpha: float = 0.01, chars: int = 80, max_new_tokens: int = 32, suspect_answers: list[str] | None = None) -> Verdict:
    """The whole test on model specs; `load(spec, role)` returns a loaded model (models.LoadedModel).
    The suspect is loaded first (one that does not load fails before any work): it answers the
    probes if the statistic needs its answers, and is kept to score the others' answers if it
    needs its weights. Then the parent and each reference in turn answer (and score the
    suspect's answers, for the reverse direction) and are dropped. A suspect known only by its
    answers to `probes` (collected from its API) comes as `suspect_answers`, with `suspect`
    None; only the statistics that need no suspect weights apply to it."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    references = list(dict.fromkeys(references))  # a repeated reference would be loaded and scored again for nothing
    if suspect_answers is not None:
        if statistic in SCORED_BY_SUSPECT:
            raise ValueError(f"statistic {statistic} needs the suspect's weights; with its answers only use "
                             f"{' or '.join(sorted(NEEDS_SUSPECT_ANSWERS - SCORED_BY_SUSPECT))}")
        if len(suspect_answers) != len(probes):
            raise ValueError(f"{len(suspect_answers)} suspect answers for {len(probes)} probes")
        mine, held = list(suspect_answers), None
    else:
        lm = load(suspect, "suspect")
        mine = answers(lm.model, lm.tokenizer, probes, max_new_tokens) if statistic in NEEDS_SUSPECT_ANSWERS else None
        held = lm if statistic in SCORED_BY_SUSPECT else None
        del lm
    ans, scored_by = {}, {}
    for role, spec in [("parent", parent)] + [("reference", r) for r in references]:
        lm = load(spec, role)
        ans[spec] = answers(lm.model, lm.tokenizer, probes, max_new_tokens)
        if statistic in SCORED_BY_OTHERS:
            scored_by[spec] = loglik(lm.model, lm.tokenizer, probes, mine, chars)
        del lm
    ll = None if held is None else {spec: loglik(held.model, held.tokenizer, probes, ans[spec], chars) for spec in [parent, *references]}
    return decide(statistic, ans, parent, references, alpha, chars, suspect_answers=mine, logliks=ll, scored_by=scored_by,
                  probes=probes)


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
