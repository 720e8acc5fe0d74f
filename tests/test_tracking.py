"""Training curves replayed into TensorBoard when a recipe asks (`log_to`)."""

from __future__ import annotations

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.train.loop import Example, TrainConfig, train
from stillhouse.train.tracking import to_tensorboard

from conftest import build_tiny_model, build_tokenizer

pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install stillhouse[tracking]")


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_matches_history(log_dir, history: list[dict]) -> None:
    scalars = read_scalars(log_dir)
    assert {"train/loss", "train/kl", "train/lr"} <= set(scalars)
    for key in ("loss", "kl", "lr"):
        steps, values = zip(*scalars[f"train/{key}"])
        assert list(steps) == list(range(1, len(history) + 1))
        assert list(values) == pytest.approx([h[key] for h in history], rel=1e-5)


def test_history_of_a_real_run_goes_to_tensorboard(tmp_path):
    tok = build_tokenizer()
    model = build_tiny_model(tok, layers=2)
    ids = tok("What is 2 + 3? 5", add_special_tokens=False)["input_ids"]
    history = train(model, [Example(ids, 8)] * 8, TrainConfig(epochs=2, batch_size=4, lr=1e-3, sft_weight=1.0, kd_weight=0.0),
                    tok.pad_token_id)
    log_dir = to_tensorboard(history, tmp_path, "distilled")
    assert log_dir == tmp_path / "tensorboard" / "distilled"
    assert_matches_history(log_dir, history)


def test_recipe_names_a_known_tracker():
    recipe = {"name": "r", "models": {"t": "smollm2-135m-instruct"}, "stages": {
        "problems": {"type": "tasks", "task": "chain_sum", "train": {"size": 2}, "eval": {"size": 2}},
        "traces": {"type": "rejection", "teacher": "t", "tasks": "problems"},
        "student": {"type": "train", "student": "t", "data": "traces", "log_to": ["wandb"]}}}
    with pytest.raises(StillhouseError, match="stages.student.log_to.0"):
        parse_recipe(recipe)
    recipe["stages"]["student"]["log_to"] = ["tensorboard"]
    assert parse_recipe(recipe).stages["student"].log_to == ["tensorboard"]
