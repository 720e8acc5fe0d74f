"""Train / validation / test splits of a task's problems, disjoint by question text.

The test split (`eval`) is drawn first and kept whole, so what is reported never depends on
the other splits; validation then drops questions the test split asks, and train drops
questions either of them asks. Repeats *within* a split are kept unless asked (`dedup`):
they are part of a small generator's distribution.
"""

from __future__ import annotations

from .dedup import drop_overlap, exact_dedup


def disjoint_splits(train: list[dict], validation: list[dict], test: list[dict], *, dedup_train: bool = False,
                    key: str = "question") -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Returns ({"train", "validation", "eval"} -> rows, counts of what was removed)."""
    n_dup = 0
    if dedup_train:
        train, n_dup = exact_dedup(train, key=key)
    validation, n_val = drop_overlap(validation, test, key=key)
    train, n_train = drop_overlap(train, test + validation, key=key)
    splits = {"train": train, "validation": validation, "eval": test}
    return splits, {"removed_duplicates": n_dup, "removed_eval_overlap": n_train, "removed_validation_overlap": n_val}
