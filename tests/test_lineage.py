"""Lineage on synthetic manifests: share propagation, errors, terms, PROV-JSON, cards, the CLI.

The workspaces here are written by hand (manifest.json files only), so every figure can be
checked against arithmetic done in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillhouse.artifacts import ArtifactStore
from stillhouse.cli import main
from stillhouse.errors import StillhouseError
from stillhouse.lineage import card_for, load_lineage, obligations, teacher_shares
from stillhouse.lineage.graph import UNKNOWN_ORIGIN
from stillhouse.lineage.prov import to_prov, validate_prov
from stillhouse.lineage.terms import lookup, registry, validate_registry

T = {"spec": "teacher-t", "weights_sha256": "a" * 64, "license": "Apache-2.0", "source": "builtin"}
T2 = {"spec": "teacher-t2", "weights_sha256": "b" * 64, "license": "gemma-terms-of-use", "source": "builtin"}
BASE = {"spec": "base-b", "weights_sha256": "c" * 64, "license": "MIT", "source": "hf-dir"}


def art(ws: Path, kind: str, aid: str, stage: str, parents=(), *, teachers=(), signal=None, base=None, **extra) -> dict:
    m = {"id": aid, "kind": kind, "stage": stage, "name": aid, "recipe": "synthetic", "config": {}, "parents": list(parents),
         "created_at": f"2026-01-01T00:00:{len(list(ws.rglob('manifest.json'))):02d}+00:00", "stillhouse_version": "0.1.0",
         "teachers": list(teachers), "counts": {}, "metrics": {}, "warnings": [], **extra}
    if signal is not None:
        m["signal"] = {"unit": "tokens", "sources": signal}
    if base is not None:
        m["base_models"] = base
    d = ws / kind / aid
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(m))
    return m


def data_by(ws, aid, teacher, parents=()):
    return art(ws, "dataset", aid, "rejection", parents, teachers=[{**teacher, "role": "data", "token_share": 1.0}])


def trained(ws, aid, data: dict[str, int], parents=(), base=(BASE,), student=None):
    sig = [{"parent": d, "role": "sft-targets", "tokens": n} for d, n in data.items()]
    if student:
        sig.append({"parent": student[0], "role": "student-weights", "tokens": student[1]})
    return art(ws, "model", aid, "train", list(parents) + list(data) + ([student[0]] if student else []), signal=sig, base=list(base))


def model_teacher(ws, aid) -> dict:
    """How a rejection stage records a teacher that is a model of the workspace."""
    return {"spec": str(ws / "model" / aid), "weights_sha256": "d" * 64, "license": "unknown", "source": "artifact"}


def shares_of(ws, ref) -> dict[str, float]:
    return {s.spec: round(s.share, 6) for s in teacher_shares(load_lineage(ArtifactStore(ws), ref))}


# -- shares ----------------------------------------------------------------------------------
def test_half_from_t_half_from_m_trained_on_t2(tmp_path):
    """The issue's example: data half from T, half from M (trained only on T2) -> 50% T, 50% T2 via M."""
    data_by(tmp_path, "d_t2", T2)
    trained(tmp_path, "m", {"d_t2": 500})
    data_by(tmp_path, "d_m", model_teacher(tmp_path, "m"))
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 300, "d_m": 300})
    lin = load_lineage(ArtifactStore(tmp_path), "s")
    shares = {s.spec: s for s in teacher_shares(lin)}
    assert {k: round(v.share, 6) for k, v in shares.items()} == {"teacher-t": 0.5, "teacher-t2": 0.5}
    (path, share), = shares["teacher-t2"].paths
    assert [lin.nodes[k].label for k in path] == ["s", "d_m", "m", "d_t2", "teacher-t2"] and share == pytest.approx(0.5)


def test_chain_of_three_students_keeps_the_original_teacher(tmp_path):
    data_by(tmp_path, "d0", T)
    prev = "d0"
    for i in range(3):
        trained(tmp_path, f"m{i}", {prev: 100})
        data_by(tmp_path, f"d{i + 1}", model_teacher(tmp_path, f"m{i}"))
        prev = f"d{i + 1}"
    assert shares_of(tmp_path, "d3") == {"teacher-t": 1.0}
    lin = load_lineage(ArtifactStore(tmp_path), "d3")
    (sh,) = teacher_shares(lin)
    assert len(sh.paths[0][0]) == 8  # d3 m2 d2 m1 d1 m0 d0 T


def test_token_weighted_several_teachers_and_a_diamond(tmp_path):
    data_by(tmp_path, "d_t", T)
    data_by(tmp_path, "d_t2", T2)
    trained(tmp_path, "m_a", {"d_t": 100})  # both branches of the diamond learn from T's data
    trained(tmp_path, "m_b", {"d_t": 100, "d_t2": 300})
    data_by(tmp_path, "d_a", model_teacher(tmp_path, "m_a"))
    data_by(tmp_path, "d_b", model_teacher(tmp_path, "m_b"))
    trained(tmp_path, "s", {"d_a": 200, "d_b": 600})
    # s: 1/4 from d_a (all T), 3/4 from d_b (1/4 T, 3/4 T2) -> T = 0.25 + 0.1875, T2 = 0.5625
    assert shares_of(tmp_path, "s") == {"teacher-t2": 0.5625, "teacher-t": 0.4375}
    lin = load_lineage(ArtifactStore(tmp_path), "s")
    t = next(s for s in teacher_shares(lin) if s.spec == "teacher-t")
    assert len(t.paths) == 2 and sum(p for _, p in t.paths) == pytest.approx(0.4375)


def test_student_weights_count_with_their_tokens_and_prune_inherits(tmp_path):
    data_by(tmp_path, "d_t", T)
    data_by(tmp_path, "d_t2", T2)
    trained(tmp_path, "m1", {"d_t": 300})
    art(tmp_path, "model", "p", "prune", ["m1", "d_t"], base=[BASE])  # pruning adds no signal
    trained(tmp_path, "m2", {"d_t2": 100}, student=("p", 300))
    assert shares_of(tmp_path, "p") == {"teacher-t": 1.0}
    assert shares_of(tmp_path, "m2") == {"teacher-t": 0.75, "teacher-t2": 0.25}


def test_imported_data_without_origin_is_unknown_never_clean(tmp_path):
    art(tmp_path, "dataset", "imp", "import", origin={"declared": False})
    art(tmp_path, "dataset", "imp_api", "import", origin={"api": "openai", "license": "openai-terms"})
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 100, "imp": 100, "imp_api": 200})
    lin = load_lineage(ArtifactStore(tmp_path), "s")
    shares = {s.key: s for s in teacher_shares(lin)}
    assert shares[UNKNOWN_ORIGIN].share == pytest.approx(0.25)
    assert shares["origin:openai"].share == pytest.approx(0.5) and shares["origin:openai"].node.license == "openai-terms"
    obs = obligations(lin)
    assert any(o["terms"] == "unknown" and o["source"] == "unknown" for o in obs)
    assert any(o["terms"] == "openai-terms" and o["rule"] == "no-competing-models" for o in obs)


# -- errors ----------------------------------------------------------------------------------
def test_missing_parent_manifest_names_the_artifact(tmp_path):
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 100, "gone": 100})
    with pytest.raises(StillhouseError, match="artifact gone \\(needed by s\\) not found"):
        load_lineage(ArtifactStore(tmp_path), "s")
    (tmp_path / "dataset" / "gone").mkdir()
    with pytest.raises(StillhouseError, match="gone \\(needed by s\\) has no manifest.json"):
        load_lineage(ArtifactStore(tmp_path), "s")


def test_corrupted_manifests_are_one_line_errors(tmp_path):
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 100})
    mf = tmp_path / "dataset" / "d_t" / "manifest.json"
    mf.write_text('{"id": "d_t", "kind": "data')
    with pytest.raises(StillhouseError, match="d_t.*corrupt"):
        load_lineage(ArtifactStore(tmp_path), "s")
    mf.write_text(json.dumps({"id": "d_t", "kind": "dataset"}))
    with pytest.raises(StillhouseError, match="d_t.*not a valid manifest \\(stage: Field required"):
        load_lineage(ArtifactStore(tmp_path), "s")
    mf.write_text(json.dumps({"id": "d_t", "kind": "dataset", "stage": "x", "parents": "s"}))
    with pytest.raises(StillhouseError, match="d_t.*not a valid manifest"):
        load_lineage(ArtifactStore(tmp_path), "s")


def test_cycles_are_reported_with_their_path(tmp_path):
    art(tmp_path, "dataset", "a", "rejection", ["c"])
    art(tmp_path, "model", "b", "train", ["a"])
    art(tmp_path, "dataset", "c", "rejection", ["b"])
    with pytest.raises(StillhouseError, match="lineage cycle: a -> c -> b -> a"):
        load_lineage(ArtifactStore(tmp_path), "a")
    # a cycle through a teacher reference is caught too
    art(tmp_path, "model", "m", "train", [], teachers=[model_teacher(tmp_path, "n")])
    art(tmp_path, "dataset", "n", "rejection", [], teachers=[model_teacher(tmp_path, "m")])
    with pytest.raises(StillhouseError, match="lineage cycle"):
        load_lineage(ArtifactStore(tmp_path), "m")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    art(tmp_path, "dataset", "a", "rejection", ["zz"])
    with pytest.raises(SystemExit) as e:
        main(["lineage", "a", "-w", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("stillhouse: error: artifact zz") and "\n" not in err


# -- terms -----------------------------------------------------------------------------------
def test_registry_is_complete_and_cites_clauses():
    validate_registry()
    reg = registry()
    for tid in ("Apache-2.0", "MIT", "CC-BY-4.0", "gemma-terms-of-use", "llama3", "llama3.1", "qwen", "openai-terms",
                "anthropic-terms", "google-gemini-api-terms", "unknown"):
        assert tid in reg
    assert lookup("apache-2.0")["id"] == "Apache-2.0" and lookup("no-such-licence")["id"] == "unknown"
    assert lookup("gemma")["outputs_make_derivative"] == "yes"
    assert {r["id"] for r in reg["llama3.3"]["rules"]} >= {"model-name", "built-with"}  # inherited from 3.1
    assert all(r["clause"] for t in reg.values() for r in t["rules"])
    assert any(t["checked"].startswith("stored-text") for t in reg.values())


def test_gemma_obligations_reach_through_an_intermediate_model(tmp_path):
    data_by(tmp_path, "d_g", T2)  # teacher-t2 is under the Gemma terms
    trained(tmp_path, "m", {"d_g": 100})
    data_by(tmp_path, "d_m", model_teacher(tmp_path, "m"))
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_m": 100, "d_t": 100})
    obs = obligations(load_lineage(ArtifactStore(tmp_path), "s"))
    gemma = [o for o in obs if o["terms"] == "gemma-terms-of-use"]
    assert {o["rule"] for o in gemma} >= {"model-derivative", "prohibited-use"}
    assert all(o["source"] == "teacher-t2" and "d_m -> m -> d_g -> teacher-t2" in o["paths"] for o in gemma)
    assert all("§" in o["clause"] for o in gemma)
    # the student's own base weights (MIT) reach it through its weights
    assert any(o["terms"] == "MIT" and o["reach"] == ["weights"] for o in obs)


# -- PROV-JSON, cards, CLI -------------------------------------------------------------------
def _two_teacher_workspace(ws: Path) -> None:
    data_by(ws, "d_g", T2)
    trained(ws, "m", {"d_g": 100})
    data_by(ws, "d_m", model_teacher(ws, "m"))
    data_by(ws, "d_t", T)
    trained(ws, "s", {"d_m": 100, "d_t": 300})


def test_prov_json_validates_and_carries_shares(tmp_path):
    _two_teacher_workspace(tmp_path)
    doc = to_prov(load_lineage(ArtifactStore(tmp_path), "s"))
    validate_prov(doc)
    assert set(doc["entity"]) >= {"art:s", "art:m", "art:d_g"} and "run:s" in doc["activity"]
    shares = {r["prov:influencer"]: float(r["sh:share"]["$"]) for r in doc["wasInfluencedBy"].values()}
    assert sorted(shares.values()) == [0.25, 0.75]
    broken = json.loads(json.dumps(doc))
    broken["wasDerivedFrom"]["_:x"] = {"prov:generatedEntity": "art:s"}
    with pytest.raises(StillhouseError, match="prov:usedEntity"):
        validate_prov(broken)
    broken = json.loads(json.dumps(doc))
    broken["used"]["_:y"] = {"prov:activity": "run:nope", "prov:entity": "art:s"}
    with pytest.raises(StillhouseError, match="not a declared activity"):
        validate_prov(broken)
    broken = json.loads(json.dumps(doc))
    broken["entity"]["zz:thing"] = {}
    with pytest.raises(StillhouseError, match="prefix 'zz' is not declared"):
        validate_prov(broken)


def test_model_card_parses_back_with_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    _two_teacher_workspace(tmp_path)
    card = ModelCard(card_for(ArtifactStore(tmp_path), "s"))
    data = card.data.to_dict()
    # MIT base weights + Gemma terms reached through m: two sets of terms, so 'other', never hard-coded
    assert data["license"] == "other" and "distillation" in data["tags"]
    assert data["base_model"] == ["base-b"] and "d_t-d_t" in data["datasets"]
    block = data["distillation"]
    assert {t["spec"]: t["share"] for t in block["teachers"]} == {"teacher-t": 0.75, "teacher-t2": 0.25}
    assert {t["spec"]: t["terms"] for t in block["teachers"]} == {"teacher-t": "Apache-2.0", "teacher-t2": "gemma-terms-of-use"}
    assert all(len(t["weights_sha256"]) == 64 for t in block["teachers"]) and block["stages"] == 5
    assert set(block["terms"]) == {"MIT", "gemma-terms-of-use"}
    assert "## Lineage" in card.text and "gemma-terms-of-use / model-derivative" in card.text


def test_card_licence_is_the_lineages_single_licence(tmp_path):
    from huggingface_hub import ModelCard

    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 10}, base=[{**BASE, "license": "Apache-2.0"}])
    assert ModelCard(card_for(ArtifactStore(tmp_path), "s")).data.license == "apache-2.0"


def test_cli_lineage_outputs(tmp_path, capsys):
    _two_teacher_workspace(tmp_path)
    ws = str(tmp_path)
    main(["lineage", "s", "-w", ws])
    out = capsys.readouterr().out
    assert "teacher-t2" in out and "25.0%" in out and "75.0%" in out
    main(["lineage", "s", "-w", ws, "--from", "teacher-t2"])
    out = capsys.readouterr().out
    assert out.startswith("yes:") and "25.0%" in out and "s <- d_m <- m <- d_g <- teacher-t2" in out
    with pytest.raises(SystemExit) as e:
        main(["lineage", "s", "-w", ws, "--from", "gpt-4o"])
    assert e.value.code == 1 and capsys.readouterr().out.startswith("no:")
    main(["lineage", "s", "-w", ws, "--terms"])
    out = capsys.readouterr().out
    assert "gemma-terms-of-use / model-derivative" in out and "Gemma Terms of Use §1.1(e)" in out
    main(["lineage", "s", "-w", ws, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert {t["spec"]: t["share"] for t in doc["teachers"]} == {"teacher-t": 0.75, "teacher-t2": 0.25}
    main(["lineage", "s", "-w", ws, "--prov"])
    validate_prov(json.loads(capsys.readouterr().out))
    main(["lineage", "s", "-w", ws, "--graph", str(tmp_path / "g.png"), "--card", str(tmp_path / "README.md")])
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "README.md").read_text().startswith("---")
    main(["lineage", "s", "-w", ws, "--graph", str(tmp_path / "g.dot")])
    assert "digraph lineage" in (tmp_path / "g.dot").read_text()


def test_graph_goes_through_graphviz_when_dot_is_installed(tmp_path, monkeypatch):
    """With `dot` on PATH the DOT source is piped to it (a stand-in `dot` here records its input)."""
    from stillhouse.lineage.render import draw, to_dot

    _two_teacher_workspace(tmp_path / "ws")
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n# usage: dot -Tfmt -o OUT < source\ncat > "$3"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    lin = load_lineage(ArtifactStore(tmp_path / "ws"), "s")
    assert draw(lin, tmp_path / "g.svg") == "dot"
    assert (tmp_path / "g.svg").read_text() == to_dot(lin)
    with pytest.raises(StillhouseError, match="unsupported picture format '.gif'"):
        draw(lin, tmp_path / "g.gif")


def test_a_teacher_from_another_workspace_is_walked_there(tmp_path):
    other = tmp_path / "other"
    data_by(other, "d_t2", T2)
    trained(other, "m", {"d_t2": 100})
    here = tmp_path / "here"
    data_by(here, "d_m", model_teacher(other, "m"))
    trained(here, "s", {"d_m": 50})
    lin = load_lineage(ArtifactStore(here), "s")
    (sh,) = teacher_shares(lin)
    assert sh.spec == "teacher-t2" and [lin.nodes[k].label for k in sh.paths[0][0]] == ["s", "d_m", "m", "d_t2", "teacher-t2"]
