"""Lineage: who an artifact was distilled from, through which stages, under which terms.

Everything here reads manifests only; nothing is re-run.
  graph.py   ancestry from manifests (artifacts, outside models, declared data origins)
  shares.py  teacher token shares propagated through any number of stages
  terms.py   the licence/terms registry (terms.yaml) and inherited obligations
  policy.py  recipe policies, checked before any compute
  cards.py   Hugging Face model cards with a `distillation:` block
  prov.py    W3C PROV-JSON export and its schema check
  render.py  terminal tree and pictures
  signal.py  what a train stage records about its training signal
"""

from __future__ import annotations

from .cards import eval_figures, merge_teachers, model_card
from .graph import Lineage, load_lineage
from .shares import teacher_shares
from .signal import record_training_signal
from .terms import obligations


def pending_card(store, manifest_view: dict) -> str:
    """The card of a model whose artifact is being written (its parents are already in `store`)."""
    lin = load_lineage(store, pending=manifest_view)
    return model_card(manifest_view.get("name") or manifest_view["id"], manifest_view, manifest_view.get("base_models") or [], lineage=lin)


def card_for(store, ref: str) -> str:
    """A refreshed card for a finished model artifact, with the evaluations found in the workspace."""
    lin = load_lineage(store, ref)
    m = lin.nodes[lin.root].manifest
    return model_card(m.get("name") or m["id"], m, m.get("base_models") or [], lineage=lin, evals=eval_figures(store, m["id"]))


__all__ = ["Lineage", "load_lineage", "teacher_shares", "obligations", "model_card", "merge_teachers",
           "record_training_signal", "pending_card", "card_for", "eval_figures"]
