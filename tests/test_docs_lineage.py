"""docs/lineage.md's two-stage example agrees with the artifacts it quotes, and the shares it
prints are the formula the doc states.

tests/data/two_stage_lineage/ holds the nine manifests (manifest.json only) of the run the doc
quotes (bench/two_stage.py, 2026-12-05). The doc's blocks between `<!-- two_stage:NAME -->`
markers are regenerated from them here and must be identical; and the shares are recomputed
from the manifests' `signal.sources` with the doc's formula, independently of lineage/shares.py,
and must be what the card prints.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from stillhouse.artifacts import ArtifactStore
from stillhouse.lineage import card_for

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "two_stage_lineage"
STUDENT2 = "72eebd501a62e6fb98c1"

sys.path.insert(0, str(ROOT / "bench"))
from two_stage import BLOCKS, blocks_in, doc_blocks, student_id, write_doc  # noqa: E402


@pytest.fixture
def ws(tmp_path) -> Path:
    shutil.copytree(DATA, tmp_path / "ws")
    return tmp_path / "ws"


def _manifests(ws: Path) -> dict[str, dict]:
    return {m.parent.name: json.loads(m.read_text()) for m in ws.glob("*/*/manifest.json")}


def formula_shares(ws: Path, aid: str) -> dict[str, float]:
    """share(node, T) = sum over sources s of tokens(s) / tokens(node) x share(s, T) (docs/lineage.md),
    written out on the raw manifests: a rejection dataset owes everything to its teacher, an
    outside teacher has a share of 1 in itself, a model of the workspace acting as a teacher
    is walked through, and pruning adds no signal."""
    manifests = _manifests(ws)

    def of(aid: str) -> dict[str, float]:
        m = manifests[aid]
        if m["stage"] == "rejection":
            (t,) = m["teachers"]
            return of(Path(t["spec"]).name) if t["source"] == "artifact" else {t["spec"]: 1.0}
        if m["stage"] == "prune":
            return of(next(p for p in m["parents"] if manifests[p]["kind"] == "model"))
        sources = m["signal"]["sources"]
        total = sum(s["tokens"] for s in sources)
        out: dict[str, float] = {}
        for s in sources:
            for spec, share in of(s["parent"]).items():
                out[spec] = out.get(spec, 0.0) + s["tokens"] / total * share
        return out

    return of(aid)


def test_the_card_prints_the_shares_of_the_docs_formula(ws):
    expected = formula_shares(ws, STUDENT2)
    assert expected == pytest.approx({"smollm2-135m-instruct": 303 / 392, "gemma3-270m": 89 / 392})
    card = yaml.safe_load(card_for(ArtifactStore(ws), STUDENT2).split("---")[1])
    printed = {t["spec"]: t["share"] for t in card["distillation"]["teachers"]}
    assert printed == {spec: round(share, 6) for spec, share in expected.items()}


def test_the_docs_example_is_what_the_artifacts_give(ws):
    doc = (ROOT / "docs" / "lineage.md").read_text()
    assert student_id(ws) == STUDENT2
    in_doc, generated = blocks_in(doc), doc_blocks(ws, STUDENT2)
    assert set(in_doc) == set(BLOCKS), "docs/lineage.md lost a two_stage marker"
    for name in BLOCKS:
        assert in_doc[name] == generated[name], (
            f"docs/lineage.md block '{name}' differs from the artifacts: rerun "
            "`python bench/two_stage.py --workspace tests/data/two_stage_lineage --no-run --write-doc docs/lineage.md`")
    # every percentage the doc's example prints is one of the card's shares, rounded
    card = yaml.safe_load(in_doc["card"].strip("`").removeprefix("yaml"))
    pct = {f"{100 * t['share']:.1f}%" for t in card["distillation"]["teachers"]}
    assert pct == {"77.3%", "22.7%"}
    for name in ("shares", "tree"):
        assert set(re.findall(r"\d+\.\d%", in_doc[name])) == pct, name
    assert set(re.findall(r"\d+\.\d%", in_doc["from"])) == {"22.7%"}


def test_write_doc_replaces_only_the_marked_blocks(ws, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n" + "".join(f"<!-- two_stage:{b} -->\nstale\n<!-- /two_stage:{b} -->\nprose {b}\n" for b in BLOCKS))
    write_doc(doc, doc_blocks(ws, STUDENT2))
    text = doc.read_text()
    assert "stale" not in text and text.startswith("intro\n") and all(f"prose {b}\n" in text for b in BLOCKS)
    assert "| gemma3-270m | gemma-terms-of-use | 22.7% |" in blocks_in(text)["shares"]
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- two_stage:NAME --> markers"):
        write_doc(doc, doc_blocks(ws, STUDENT2))
    assert doc.read_text() == "no markers\n"
