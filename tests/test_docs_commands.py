"""The commands README.md and docs/*.md name next to their figures exist as written.

Every figure in the docs names the command that produces it (issue 20). This keeps those
names honest as the code moves: each `bench/NAME.py` named exists and declares every `--flag`
written after it, each `tests/test_x.py[::test_name]` exists, and each `--preset NAME` is a
built-in recipe (a documented `quickstart_long` preset once did not exist). Read from the
scripts' source, nothing is run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a bench script and what follows it on the line (continued lines joined by a trailing backslash)
BENCH = re.compile(r"bench/([a-z_0-9]+)\.py((?:[ \t]+(?:\\\n\s*)?(?:--?[a-z][a-z0-9-]*|[^\s`|)]+))*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
TEST = re.compile(r"tests/(test_[a-z_0-9]+\.py)(?:::([a-z_0-9]+))?")
PRESET = re.compile(r"--preset[ =]([a-z_0-9]+)")


def _where(doc: Path, text: str, pos: int) -> str:
    return f"{doc.relative_to(ROOT)}:{text[:pos].count(chr(10)) + 1}"


def _declared_flags(script: Path) -> set[str]:
    """Options the script's argparse declares (`add_argument("--x", ...)`, also in a loop over names)."""
    return set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text()))


def _mentions(pattern: re.Pattern, docs=DOCS):
    for doc in docs:
        text = doc.read_text()
        for m in pattern.finditer(text):
            yield doc, text, m


def bench_problems(docs) -> tuple[int, list[str]]:
    """(bench commands seen, what is wrong with them) in `docs`."""
    problems, seen = [], 0
    for doc, text, m in _mentions(BENCH, docs):
        seen += 1
        script = ROOT / "bench" / f"{m.group(1)}.py"
        if not script.exists():
            problems.append(f"{_where(doc, text, m.start())}: bench/{m.group(1)}.py does not exist")
            continue
        for flag in sorted(set(FLAG.findall(m.group(2))) - _declared_flags(script) - {"--help"}):
            problems.append(f"{_where(doc, text, m.start())}: bench/{m.group(1)}.py has no option {flag}")
    return seen, problems


def test_every_bench_command_named_in_the_docs_exists_with_its_flags():
    seen, problems = bench_problems(DOCS)
    assert seen > 50, "the docs' bench commands were not found (the pattern no longer matches)"
    assert not problems, "\n".join(problems)


def test_every_test_named_in_the_docs_exists():
    problems = []
    for doc, text, m in _mentions(TEST):
        path = ROOT / "tests" / m.group(1)
        if not path.exists():
            problems.append(f"{_where(doc, text, m.start())}: tests/{m.group(1)} does not exist")
        elif m.group(2) and not re.search(rf"def {m.group(2)}\b", path.read_text()):
            problems.append(f"{_where(doc, text, m.start())}: tests/{m.group(1)} has no {m.group(2)}")
    assert not problems, "\n".join(problems)


def test_every_preset_named_in_the_docs_and_benches_is_a_builtin_recipe():
    builtin = {p.stem for p in (ROOT / "src" / "stillhouse" / "recipes").glob("*.yaml")}  # what `builtin_recipe` reads
    texts = [(doc, doc.read_text()) for doc in DOCS]
    texts += [(p, p.read_text()) for p in [*sorted((ROOT / "bench").glob("*.py")), ROOT / "src" / "stillhouse" / "cli.py"]]
    problems = [f"{_where(doc, text, m.start())}: no built-in recipe '{m.group(1)}' (have {sorted(builtin)})"
                for doc, text in texts for m in PRESET.finditer(text) if m.group(1) not in builtin]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, expected", [
    ("`python bench/train.py --steps 40 --nope 2`", "bench/train.py has no option --nope"),
    ("python bench/no_such_script.py", "bench/no_such_script.py does not exist"),
])
def test_the_checker_catches_a_wrong_command(tmp_path, line, expected):
    doc = ROOT / "docs" / f".probe-{tmp_path.name}.md"  # under ROOT, so its path prints relative
    try:
        doc.write_text(f"a figure: 1.5x ({line})\n")
        seen, problems = bench_problems([doc])
    finally:
        doc.unlink()
    assert seen == 1 and len(problems) == 1 and expected in problems[0]
