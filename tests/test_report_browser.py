"""The HTML report in a real browser: headless Chromium renders it offline, the screenshot shows
the table and the charts, and the DOM holds them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stillhouse import models
from stillhouse.artifacts import ArtifactStore
from stillhouse.eval.compare import EvalSettings, run_comparison
from stillhouse.eval.report import make_report
from stillhouse.train.loop import Example, TrainConfig, train

from conftest import build_tiny_model, build_tokenizer

TEACHER_BLUE = (0x4C, 0x72, 0xB0)  # charts.TEACHER
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--disable-dev-shm-usage"]


def chromium() -> str:
    """Debian's chromium, installed here when missing (the test machines run as root)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=1200,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed and could not be installed (apt-get install chromium)")
    return exe


def run_browser(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per launch
    return subprocess.run([exe, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A report on a real (tiny) comparison: a teacher and a student trained for a few steps."""
    root = tmp_path_factory.mktemp("browser-report")
    ws = root / "ws"
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    teacher = build_tiny_model(tok, seed=0, layers=4)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = build_tiny_model(tok, seed=1, layers=2)
    ids = tok("What is 2 + 3? 5", add_special_tokens=False)["input_ids"]
    history = train(student, [Example(ids, 8)] * 8, TrainConfig(epochs=3, batch_size=4, lr=1e-3, sft_weight=1.0, kd_weight=0.0),
                    tok.pad_token_id)
    store = ArtifactStore(ws)
    with store.create("model", "tinystudent0000000000", stage="train", name="student", config={}, parents=[]) as out:
        models.save(student, tok, out.path)
        (out.path / "metrics.jsonl").write_text("".join(__import__("json").dumps(h) + "\n" for h in history))
    spec = str(ws / "model" / "tinystudent0000000000")
    art, _ = run_comparison([str(root / "teacher"), spec], ["rg:chain_sum,size=4,max_new_tokens=4"], ws,
                            EvalSettings(batch_size=4, speed_batches=(1, 4), speed_tokens=4, bootstrap=200, memory=False))
    rep = make_report([art.id], ws, title="browser check")
    assert rep.manifest["parents"] == [art.id, "tinystudent0000000000"]  # the trained student's curves came along
    return rep.path


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    exe = chromium()
    url = (report_dir / "report.html").as_uri()
    shot = tmp_path / "report.png"
    proc = run_browser(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,2600", url)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert img.shape == (2600, 1280, 3)
    non_white = (img.sum(-1) < 720).mean()
    assert non_white > 0.01, f"screenshot is nearly blank ({non_white:.1%} non-white)"
    assert len(np.unique(img[::4, ::4].reshape(-1, 3), axis=0)) > 200  # text, table lines and charts, not a flat page
    # the charts were decoded and drawn: the teacher's blue appears on screen
    assert (np.abs(img - np.array(TEACHER_BLUE)).max(-1) < 25).sum() > 500, "no chart colours in the screenshot"
    if os.environ.get("STILLHOUSE_KEEP_SCREENSHOT"):  # to look at it: the file named by the variable
        shutil.copy(shot, os.environ["STILLHOUSE_KEEP_SCREENSHOT"])

    dom = run_browser(exe, tmp_path, "--dump-dom", url).stdout
    assert "<table>" in dom and dom.count("<tr>") >= 3  # header + teacher + student
    assert "teacher" in dom and "student" in dom
    assert dom.count('src="data:image/png;base64,') == 4  # pass rates, Pareto, training curves, lineage graph
    for heading in ("Accuracy against speed", "Training", "Lineage"):
        assert heading in dom
