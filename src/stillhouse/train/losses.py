"""Distillation losses as pure functions: `loss(student_logits, teacher_signal, mask, **params)`.

Every divergence is written once, on two log-probability tensors over the same support
(`_divergences`): the full vocabulary for dense teacher logits, or k + 1 buckets for a sparse
top-k signal (the teacher's k tokens plus one bucket for the rest of the vocabulary). The
student's rest bucket is exact (a logsumexp over the tokens outside the teacher's top-k), so
no sparse signal is ever expanded to a vocabulary-wide array.

Rows are processed in chunks of about `CHUNK_ELEMENTS` logits (`rows_per_chunk`: 21 rows at
SmolLM2's 49k vocabulary); under autograd each chunk is checkpointed, so the fp32
log-softmax buffers of one chunk exist at a time, in the forward pass and again in the
backward pass, instead of [positions, vocab] buffers for the whole batch. Callers that select positions
before the LM head (the training loop does) pass [N, vocab]; [B, L, vocab] plus a [B, L]
mask works too. Divergences are scaled by T^2 (Hinton et al.) so gradient magnitudes stay
comparable across temperatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Log-probabilities are clamped here so that 0 * log 0 terms stay 0 in value and gradient.
_LOG_FLOOR = -1e4
# Logits per chunk of rows (4 MB per fp32 buffer): small next to a model's weights at any
# vocabulary, large enough that the per-chunk overhead does not show in a step's time.
CHUNK_ELEMENTS = 1 << 20


def rows_per_chunk(vocab: int, chunk: int | None = None) -> int:
    """Rows processed at once: `chunk` if given, else as many as fit in CHUNK_ELEMENTS."""
    return chunk if chunk else max(1, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass
class TopK:
    """A sparse teacher signal for N positions: top-k ids and log-probs (at T = 1, over the
    full vocabulary), plus the probability mass outside the top-k (`rest`, [N]).

    Without `rest` the teacher is taken as its top-k renormalised (older caches stored no rest).
    """

    ids: torch.Tensor  # [N, k] long
    logprobs: torch.Tensor  # [N, k]; -inf marks padding in rows with fewer entries
    rest: torch.Tensor | None = None  # [N] probability mass not in the top-k

    def __getitem__(self, rows) -> "TopK":
        return TopK(self.ids[rows], self.logprobs[rows], None if self.rest is None else self.rest[rows])

    def __len__(self) -> int:
        return self.ids.size(0)


# -- divergences over a shared support: rows of log-probs [n, m] -> [n] ----------------------
def _plogq(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i): KL(p || q) per row."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q), stably."""
    if w <= 0.0:
        return lq
    if w >= 1.0:
        return lp
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def forward_kl_rows(ls, lt, **_):
    """KL(teacher || student): mean-seeking, the classic KD objective."""
    return _plogq(lt, ls)


def reverse_kl_rows(ls, lt, **_):
    """KL(student || teacher): mode-seeking."""
    return _plogq(ls, lt)


def jsd_rows(ls, lt, beta: float = 0.5, **_):
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024):
    beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S.

    As TRL's GKDTrainer does, beta = 0 means forward KL and beta = 1 reverse KL (the limits
    of the divergence up to scale), so one knob spans the three.
    """
    if beta <= 0.0:
        return _plogq(lt, ls)
    if beta >= 1.0:
        return _plogq(ls, lt)
    lm = _mix(lt, ls, beta)
    return beta * _plogq(lt, lm) + (1 - beta) * _plogq(ls, lm)


def skew_forward_kl_rows(ls, lt, alpha: float = 0.1, **_):
    """KL(T || alpha T + (1 - alpha) S) (DistiLLM, Ko et al. 2024): bounded, stable gradients."""
    return _plogq(lt, _mix(lt, ls, alpha))


def skew_reverse_kl_rows(ls, lt, alpha: float = 0.1, **_):
    """KL(S || alpha S + (1 - alpha) T) (DistiLLM)."""
    return _plogq(ls, _mix(ls, lt, alpha))


def tv_rows(ls, lt, **_):
    """Total variation distance: half the L1 distance between the distributions."""
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl_rows,
    "reverse_kl": reverse_kl_rows,
    "jsd": jsd_rows,
    "skew_forward_kl": skew_forward_kl_rows,
    "skew_reverse_kl": skew_reverse_kl_rows,
    "tv": tv_rows,
}
# Names a recipe may use in `loss:`; "sft" is cross-entropy on the data's tokens.
LOSS_NAMES = ("sft", *DIVERGENCES)
# Divergences that are finite only where the teacher has support: they need the rest mass.
_NEEDS_REST = {"reverse_kl"}


# -- supports: dense logits or a sparse top-k signal -> paired log-prob rows ---------------
def _dense_support(s: torch.Tensor, t: torch.Tensor, temperature: float):
    return F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1)


def _sparse_support(s: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, rest, temperature: float):
    """k + 1 buckets: the teacher's top-k tokens, then everything else.

    At T != 1 the teacher's rest bucket is tempered as if it were one token (its inner split
    is not stored); at T = 1, and for the student at any T, the buckets are exact.
    """
    ls_full = F.log_softmax(s.float() / temperature, -1)
    lt = lps.float()
    # rows with fewer than k entries are padded with log-prob -inf (a repeated id): both
    # sides put zero mass there, and the student's rest bucket still excludes real entries only
    pad = torch.isneginf(lt)
    ls_top = ls_full.gather(-1, ids).masked_fill(pad, float("-inf"))
    ls_rest = ls_full.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    if rest is None:
        lt_rest = torch.full_like(lt[:, :1], float("-inf"))
    else:
        lt_rest = rest.float().clamp(min=0).log().unsqueeze(-1)
    # renormalised: absorbs quantisation error in a cache, and the missing rest when None
    lt = F.log_softmax(torch.cat([lt, lt_rest], -1) / temperature, -1)
    ls = torch.cat([ls_top, ls_rest], -1)
    return ls.clamp(min=_LOG_FLOOR), lt.clamp(min=_LOG_FLOOR)


def _rows_value(fn, temperature, params, s, t, *sparse):
    if sparse:
        ls, lt = _sparse_support(s, t, sparse[0], sparse[1] if len(sparse) > 1 else None, temperature)
    else:
        ls, lt = _dense_support(s, t, temperature)
    return fn(ls, lt, **params).sum()


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk: int | None = None,
    reduction: str = "mean",
    **params,
) -> torch.Tensor:
    """A divergence between teacher and student at the positions `mask` selects (all if None).

    `teacher` is dense logits shaped like `student_logits`, or a `TopK` with one row per
    position. `reduction="sum"` returns the sum over positions, for callers that normalise
    by a token count of their own (gradient accumulation).
    """
    fn = DIVERGENCES[name]
    sparse = isinstance(teacher, TopK)
    if sparse and teacher.rest is None and name in _NEEDS_REST:
        raise ValueError(f"{name} against a top-k signal needs the teacher's remaining mass (a logit cache stores it)")
    s = student_logits.reshape(-1, student_logits.size(-1))
    if sparse:
        t = TopK(
            teacher.ids.reshape(-1, teacher.ids.size(-1)), teacher.logprobs.reshape(-1, teacher.ids.size(-1)),
            None if teacher.rest is None else teacher.rest.reshape(-1),
        )
    else:
        if teacher.size(-1) != student_logits.size(-1):
            raise ValueError(f"student logits have {student_logits.size(-1)} columns, the teacher's {teacher.size(-1)}: "
                             "compare them on the tokenizer's vocabulary (alignment.shared_vocab)")
        t = teacher.reshape(-1, teacher.size(-1))
    n_teacher = len(t) if sparse else t.size(0)
    if s.size(0) != n_teacher:
        raise ValueError(f"student has {s.size(0)} positions, the teacher signal {n_teacher}")
    keep = None if mask is None else mask.reshape(-1).bool()
    total = s.new_zeros((), dtype=torch.float32)
    count = 0
    chunk = rows_per_chunk(s.size(-1), chunk)
    # split, not s[a:b]: each slice's backward writes into a zero [rows, vocab] tensor of the
    # whole input, once per chunk; split's backward concatenates the chunks' gradients once
    for start, piece in zip(range(0, s.size(0), chunk), s.split(chunk)):
        sl = slice(start, start + piece.size(0))
        rows = None if keep is None else keep[sl].nonzero().squeeze(-1)
        sc = piece if rows is None else piece[rows]
        tc = t[sl] if rows is None else t[sl][rows]
        if sc.size(0) == 0:
            continue
        count += sc.size(0)
        if sparse:
            args = (sc, tc.ids, tc.logprobs) + (() if tc.rest is None else (tc.rest,))
        else:
            args = (sc, tc)
        if torch.is_grad_enabled() and sc.requires_grad:
            total = total + checkpoint(_rows_value, fn, temperature, params, *args, use_reentrant=False)
        else:
            total = total + _rows_value(fn, temperature, params, *args)
    total = total * temperature**2
    if reduction == "sum":
        return total if count else student_logits.sum() * 0.0
    if count == 0:
        return student_logits.sum() * 0.0
    return total / count


def cross_entropy(
    student_logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy (SFT on teacher text); targets equal to -100 are ignored."""
    s = student_logits.reshape(-1, student_logits.size(-1))
    chunk = rows_per_chunk(s.size(-1), chunk)
    y = targets.reshape(-1)
    n = int((y != -100).sum())
    if n == 0:
        return student_logits.sum() * 0.0
    total = s.new_zeros((), dtype=torch.float32)
    for piece, yc in zip(s.split(chunk), y.split(chunk)):  # split: see `divergence`
        total = total + F.cross_entropy(piece.float(), yc, reduction="sum", ignore_index=-100)
    return total if reduction == "sum" else total / n


# -- mixtures from the recipe ----------------------------------------------------------------
@dataclass(frozen=True)
class LossTerm:
    name: str  # "sft", a key of DIVERGENCES, or "uld" (cross-tokenizer, with a SortedProbs signal)
    weight: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew KLs

    def params(self) -> dict:
        return {"beta": self.beta} if self.name == "jsd" else {"alpha": self.alpha} if self.name.startswith("skew") else {}


def terms_from_weights(sft_weight: float, kd_weight: float) -> list[LossTerm]:
    """The legacy two-knob objective: SFT plus forward KL."""
    return [LossTerm("sft", sft_weight), LossTerm("forward_kl", kd_weight)]


def needs_teacher(terms: list[LossTerm]) -> bool:
    """Whether a term compares against teacher logits or a cached top-k (same tokenizer)."""
    return any(t.name not in ("sft", "uld") and t.weight > 0 for t in terms)


def needs_sorted(terms: list[LossTerm]) -> bool:
    """Whether a term compares against the teacher's sorted probabilities (cross-tokenizer)."""
    return any(t.name == "uld" and t.weight > 0 for t in terms)


def mixture(
    terms: list[LossTerm],
    student_logits: torch.Tensor,
    targets: torch.Tensor | None,
    teacher: torch.Tensor | TopK | None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    sorted_teacher: "SortedProbs | None" = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms, and each term's unweighted value for the log.

    Logging the terms apart shows when one is orders of magnitude smaller than another and
    its weight does nothing. A "uld" term reads `sorted_teacher` (its rows only: the
    positions where the two tokenizations align).
    """
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for term in terms:
        if term.weight == 0:
            continue
        if term.name == "sft":
            value = cross_entropy(student_logits, targets, reduction=reduction)
        elif term.name == "uld":
            if sorted_teacher is None:
                raise ValueError("loss term 'uld' needs the teacher's sorted probabilities")
            value = sorted_wasserstein(student_logits[sorted_teacher.rows], sorted_teacher.top, sorted_teacher.rest,
                                       temperature, reduction=reduction)
        else:
            if teacher is None:
                raise ValueError(f"loss term '{term.name}' needs a teacher signal")
            value = divergence(term.name, student_logits, teacher, temperature=temperature, reduction=reduction,
                               **term.params())
        total = total + term.weight * value
        parts[term.name] = value.item()
    return total, parts


# -- policy gradient (on-policy distillation and reward-based training share it) -----------
def policy_gradient(token_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """REINFORCE on sampled tokens: -mean(advantage * log p(token)), advantages held constant.

    On-policy samples make the importance ratio 1; with advantage -(log p_s - log p_t) the
    expected gradient is that of the reverse KL to the teacher. `reduction="sum"` returns the
    sum over tokens, for the training loop, which normalises by the whole step's tokens.
    """
    adv = advantages.detach().float()
    lp = token_logprobs.float()
    if mask is not None:
        keep = mask.bool()
        lp, adv = lp[keep], adv[keep]
    if lp.numel() == 0:
        return token_logprobs.sum() * 0.0
    total = -(adv * lp).sum()
    return total if reduction == "sum" else total / lp.numel()


# -- cross-tokenizer: no shared vocabulary ---------------------------------------------------
@dataclass
class SortedProbs:
    """A teacher signal without token ids: at some of N positions (`rows`), the teacher's k
    largest probabilities, sorted, and the mass beyond them."""

    rows: torch.Tensor  # [M] long, indices into the N scored positions
    top: torch.Tensor  # [M, k]
    rest: torch.Tensor  # [M]


def sorted_probs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities of each row, sorted (ids dropped), and the mass of the rest."""
    p = F.softmax(logits.float() / temperature, -1)
    top = p.topk(min(k, p.size(-1)), -1).values
    return top, (1 - top.sum(-1)).clamp(min=0)


def sorted_wasserstein(
    student_logits: torch.Tensor, teacher_top: torch.Tensor, teacher_rest: torch.Tensor,
    temperature: float = 1.0, chunk: int | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two
    distributions' sorted probability vectors, which needs no shared vocabulary.

    The teacher side is its top-k sorted probabilities plus the mass beyond them; the student
    is compared on its own top-k and its rest, so the full sort never spans two vocabularies.
    """
    n = student_logits.size(0)
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    k = teacher_top.size(-1)
    chunk = rows_per_chunk(student_logits.size(-1), chunk)
    for piece, t_top, t_rest in zip(student_logits.split(chunk), teacher_top.split(chunk), teacher_rest.split(chunk)):  # split: see `divergence`
        s_top, s_rest = sorted_probs(piece, k, temperature)
        if s_top.size(-1) < k:  # a student vocabulary smaller than k: zero-probability tail
            s_top = F.pad(s_top, (0, k - s_top.size(-1)))
        total = total + (s_top - t_top.float()).abs().sum() + (s_rest - t_rest.float()).abs().sum()
    return total if reduction == "sum" else total / n
