"""Progress output that tells the truth: per-pass decode rates, one line per step in a log, tables
that stay readable at 80 columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from stillhouse import progress as progress_mod
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher, render_chat


@pytest.fixture
def log_console(monkeypatch):
    """The progress console as a CI log or `| tee` sees it: not a terminal, 80 columns."""
    buf = io.StringIO()
    monkeypatch.setenv("STILLHOUSE_QUIET", "0")
    monkeypatch.setattr(progress_mod, "console", Console(file=buf, width=80, force_terminal=False))
    return buf


def test_a_log_gets_one_line_per_finished_step(log_console):
    for step in ("Converting", "Generating"):
        with progress_mod.progress(step, total=50) as advance:
            for i in range(50):
                advance(1, info=f"{i} tok/s")
    lines = [x for x in log_console.getvalue().splitlines() if x.strip()]
    assert len(lines) == 2 and lines[0].startswith("Converting") and lines[1].startswith("Generating")
    assert "50/50" in lines[1] and "49 tok/s" in lines[1] and "\r" not in log_console.getvalue()


def test_generation_rate_is_this_passes_not_cumulative(tiny, monkeypatch):
    """A teacher serves every shard of a stage; the rate shown for a shard counts that shard's
    tokens over that shard's time (it used to divide the lifetime count by the shard's time)."""
    import stillhouse.teachers.hf as hf

    clock = iter(range(10_000))
    monkeypatch.setattr(hf.time, "perf_counter", lambda: float(next(clock)))  # 1 s per reading
    infos = []

    class Capture:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return lambda n=1, info=None: infos.append(info)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(hf, "progress", Capture)
    teacher = HFTeacher(tiny.model, tiny.tokenizer, batch_size=8)
    texts = [render_chat(tiny.tokenizer, [{"role": "user", "content": q}]) for q in ("2+2?", "hello there")]
    params = SamplingParams(max_new_tokens=6)
    teacher.generate_text(texts, params)
    first_tokens = teacher.stats["generated_tokens"]
    teacher.generate_text(texts, params)  # the same greedy work again
    assert teacher.stats["generated_tokens"] == 2 * first_tokens
    assert infos[0] == infos[1] == f"{first_tokens:.0f} tok/s"  # one batch, one second: not doubled


def test_report_tables_never_fold_a_word_at_80_columns():
    from stillhouse.eval.report import Table, print_table

    headers = ["model", "pass@1 (n=64) [95% CI]", "difference to teacher [95% CI]", "agrees with teacher", "perplexity"]
    rows = [["student-with-a-long-name", "0.412 [0.300, 0.520]", "-0.100 [-0.200, +0.010] (same)", "0.812", "15.00"]]
    buf = io.StringIO()
    print_table(Table(headers, rows, [False] + [True] * 4), "accuracy", Console(file=buf, width=80))
    text = buf.getvalue()
    for word in {w for h in headers for w in h.split()} | set(rows[0]):
        assert word in text, word  # every header word and every cell is on one line, unbroken
