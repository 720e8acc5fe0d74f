"""Antidistillation sampling (Savani et al., 2025): answers that stay useful but teach a student less.

The teacher samples from its logits plus `lam` times, for each candidate token, how much a
proxy student's loss on a downstream task would *rise* if the proxy were fine-tuned on that
token. One SGD step on token i moves the proxy's weights by eta * grad log p(i | x), which
changes its downstream loss L by about eta * <grad L, grad log p(i | x)>: the directional
derivative of log p(i | x) along g = grad L. That derivative is one finite difference of two
perturbed proxies, computed once per step for the whole vocabulary:

    delta_i = (log p_{theta + eps g}(i | x) - log p_{theta - eps g}(i | x)) / (2 eps)
    logits' = logits + lam * delta / std(delta)

(g is normalised to unit length; delta is normalised per step so that `lam` is in units of the
logits and one setting carries across proxies.) lam = 0 is plain sampling; larger lam poisons
more and costs the teacher more: bench/antidistill.py measures the trade-off.

The two proxies keep their own KV caches across decoding steps (rows that leave the batch are
dropped from them), so a step costs two one-token forwards of the proxy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ..errors import StillhouseError
from ..strict import Strict


class Downstream(Strict):
    """The task whose loss the teacher's answers should make worse for a student."""

    task: str = "chain_sum"  # a reasoning-gym task (as in a recipe's tasks stage)
    config: dict = Field(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2})
    problems: int = Field(64, ge=1)  # problems whose reference answers define the proxy's loss
    seed: int = 7  # their generator seed: keep it apart from the splits you evaluate on


class AntidistillConfig(Strict):
    """`stillhouse serve MODEL --antidistill FILE.yaml` (and bench/antidistill.py)."""

    proxy: str  # model spec of the proxy student; it must share the teacher's tokenizer
    proxy_layers: int | None = Field(None, ge=1)  # keep only the proxy's first N decoder blocks (a cheap proxy)
    lam: float = Field(1.0, ge=0)  # strength, in logit units per standard deviation of delta (0: off)
    eps: float = Field(0.05, gt=0)  # finite-difference step along the unit gradient, in weight-space norm
    downstream: Downstream = Field(default_factory=Downstream)


def load_config(path: str | Path) -> AntidistillConfig:
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise StillhouseError(f"antidistill config not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        return AntidistillConfig.model_validate(raw)
    except yaml.YAMLError as e:
        raise StillhouseError(f"{p}: not YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise StillhouseError(f"{p}: {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}") from None


def downstream_examples(tokenizer, ds: Downstream) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the downstream problems: the chat prompt and the reference answer."""
    from ..eval.measure import messages_for
    from ..teachers.hf import encode_prompt, render_chat
    from ..verify.reasoning_gym import problems

    out = []
    for r in problems(ds.task, ds.config, ds.problems, ds.seed):
        p = encode_prompt(tokenizer, render_chat(tokenizer, messages_for(r)))
        a = tokenizer(str(r["answer"]), add_special_tokens=False)["input_ids"]
        out.append((p, a))
    return out


def loss_gradient(model, examples: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Unit-norm gradient (one tensor per parameter) of the model's mean answer NLL."""
    model.zero_grad(set_to_none=True)
    model.train(False)
    total = sum(len(a) for _, a in examples)
    for p, a in examples:
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="sum") / total
        loss.backward()
    grads = [q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q) for q in model.parameters()]
    model.zero_grad(set_to_none=True)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    if not torch.isfinite(norm) or norm == 0:
        raise StillhouseError("antidistill: the proxy's downstream loss has no usable gradient")
    return [g / norm for g in grads]


def perturbed(model, direction: list[torch.Tensor], step: float):
    """A copy of `model` with weights + step * direction (tied weights stay tied: they are one Parameter)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for q, d in zip(m.parameters(), direction):
            q.add_(d, alpha=step)
    return m.eval()


class AntidistillProcessor:
    """logits + lam * normalised delta (see the module docstring); transformers' LogitsProcessor
    signature `(ids [rows, seq] left-padded with pad_id, scores [rows, vocab]) -> scores`."""

    def __init__(self, plus, minus, lam: float, eps: float, pad_id: int):
        self.plus, self.minus = plus, minus
        self.lam, self.eps, self.pad_id = lam, eps, pad_id
        self._ids = None  # the histories seen at the previous step
        self._caches = None
        self._mask = None

    def __call__(self, input_ids, scores):
        if self.lam == 0:
            return scores
        ids = input_ids.cpu()
        lp_plus, lp_minus = self._next_logprobs(ids)
        delta = (lp_plus - lp_minus) / (2 * self.eps)
        delta = delta - delta.mean(-1, keepdim=True)
        delta = delta / delta.std(-1, keepdim=True).clamp_min(1e-8)
        return scores + self.lam * delta.to(scores.dtype)

    def _rows_from_previous(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Indices of the previous step's rows that `ids` extends by one token, or None."""
        prev = self._ids
        if prev is None or ids.shape[1] != prev.shape[1] + 1 or ids.shape[0] > prev.shape[0]:
            return None
        same = (ids[:, None, :-1] == prev[None, :, :]).all(-1)  # [new rows, old rows]
        if not same.any(-1).all():
            return None
        return same.float().argmax(-1)

    @torch.inference_mode()
    def _next_logprobs(self, ids: torch.Tensor):
        from transformers import DynamicCache

        rows = self._rows_from_previous(ids)
        if rows is None:  # a new batch: run the proxies over the whole histories
            started = (ids != self.pad_id).long().cumsum(-1) > 0  # left padding: before the first real token
            self._mask = started.long()
            self._caches = [DynamicCache(), DynamicCache()]
            feed, mask = ids, self._mask
        else:
            if rows.numel() != self._ids.shape[0] or not torch.equal(rows, torch.arange(rows.numel())):
                for c in self._caches:
                    c.batch_select_indices(rows)
                self._mask = self._mask[rows]
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(ids), 1)], -1)
            feed, mask = ids[:, -1:], self._mask
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -feed.shape[1]:]
        out = []
        for model, cache in zip((self.plus, self.minus), self._caches):
            logits = model(input_ids=feed, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()
            out.append(torch.log_softmax(logits, -1))
        self._ids = ids
        return out

    def __repr__(self) -> str:
        return f"AntidistillProcessor(lam={self.lam}, eps={self.eps})"


def build(cfg: AntidistillConfig, teacher_tokenizer, proxy=None) -> AntidistillProcessor:
    """The processor for a teacher: loads (or takes) the proxy, checks its tokenizer, takes the
    downstream gradient once and makes the two perturbed proxies."""
    from .. import models
    from ..train.students import prune_depth

    if proxy is None:
        try:
            loaded = models.load(cfg.proxy)
        except StillhouseError as e:
            raise StillhouseError(f"antidistill proxy {cfg.proxy} does not load: {e}") from None
        proxy, proxy_tok = loaded.model, loaded.tokenizer
        if proxy_tok.get_vocab() != teacher_tokenizer.get_vocab():
            raise StillhouseError(f"antidistill proxy {cfg.proxy} has a different tokenizer from the teacher")
    if cfg.proxy_layers is not None:
        n = proxy.config.num_hidden_layers
        if cfg.proxy_layers > n:
            raise StillhouseError(f"antidistill proxy_layers {cfg.proxy_layers} exceeds the proxy's {n} layers")
        proxy = prune_depth(proxy, list(range(cfg.proxy_layers)))
    proxy = proxy.float()
    direction = loss_gradient(proxy, downstream_examples(teacher_tokenizer, cfg.downstream))
    return AntidistillProcessor(perturbed(proxy, direction, cfg.eps), perturbed(proxy, direction, -cfg.eps),
                                cfg.lam, cfg.eps, teacher_tokenizer.pad_token_id)
