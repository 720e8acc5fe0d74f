"""A student saved by stillhouse evaluates with lm-evaluation-harness unchanged.

`lm_eval --model hf --model_args pretrained=DIR` on a local multiple-choice task (a task YAML
and a JSONL file written here; nothing from a hub), and its accuracy checked against the
student's own log-likelihoods computed directly.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stillhouse import models
from stillhouse.artifacts import ArtifactStore
from stillhouse.train import students

from conftest import build_tiny_model, build_tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install stillhouse[lm-eval]")

DOCS = [
    {"question": "2 + 3 =", "choices": ["5", "7"], "label": 0},
    {"question": "4 + 4 =", "choices": ["9", "8"], "label": 1},
    {"question": "1 + 1 =", "choices": ["2", "3"], "label": 0},
    {"question": "6 + 1 =", "choices": ["7", "61"], "label": 0},
]
TASK = """task: stillhouse_tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), the quantity lm-eval's multiple choice compares."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_saved_student_runs_in_lm_eval_unchanged(tmp_path):
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    teacher = build_tiny_model(tok, seed=3, layers=4)
    student = students.prune_depth(teacher, [0, 3])  # a depth-pruned student, as the prune stage makes
    store = ArtifactStore(tmp_path / "ws")
    with store.create("model", "lmevalstudent0000000", stage="prune", name="student", config={}, parents=[]) as out:
        models.save(student, tok, out.path)
    model_dir = tmp_path / "ws" / "model" / "lmevalstudent0000000"

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_sums.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "ds-cache")}
    exe = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(exe), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                           "--tasks", "stillhouse_tiny_sums", "--include_path", str(tasks), "--device", "cpu",
                           "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1, proc.stdout[-2000:]
    acc = json.loads(Path(files[0]).read_text())["results"]["stillhouse_tiny_sums"]["acc,none"]

    reloaded = models.load(str(model_dir))
    # lm-eval joins question and answer with its default target delimiter, one space
    picks = [max(range(len(d["choices"])), key=lambda i: _loglik(reloaded.model, reloaded.tokenizer, d["question"], " " + d["choices"][i]))
             for d in DOCS]
    assert acc == pytest.approx(sum(p == d["label"] for p, d in zip(picks, DOCS)) / len(DOCS))
