"""The AI bill of materials: a lineage as CycloneDX 1.6, checked against the official JSON schema
(cyclonedx-python-lib's copy), on the hand-written workspaces of test_lineage."""

from __future__ import annotations

import json

import pytest

from stillhouse.artifacts import ArtifactStore
from stillhouse.cli import main
from stillhouse.errors import StillhouseError
from stillhouse.lineage import load_lineage
from stillhouse.lineage.bom import to_cyclonedx, validate_cyclonedx
from test_lineage import T, _two_teacher_workspace, art, data_by, trained


def _bom(ws, ref="s") -> dict:
    doc = to_cyclonedx(load_lineage(ArtifactStore(ws), ref))
    validate_cyclonedx(doc)
    return doc


def _props(c: dict, name: str) -> list[str]:
    return [p["value"] for p in c.get("properties", []) if p["name"] == f"stillhouse:{name}"]


def test_bom_lists_models_datasets_teachers_terms_and_the_chain(tmp_path):
    _two_teacher_workspace(tmp_path)
    doc = _bom(tmp_path)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    root = doc["metadata"]["component"]
    assert root["type"] == "machine-learning-model" and root["name"] == "s"
    # the model card names the datasets the root learned from
    assert {d["ref"] for d in root["modelCard"]["modelParameters"]["datasets"]} == {"dataset:d_m", "dataset:d_t"}
    assert sorted(_props(root, "teacher_share")) == ["teacher-t2=0.250000", "teacher-t=0.750000"]
    # every lineage node but the root is a component; outside teachers carry hash and terms
    by_ref = {c["bom-ref"]: c for c in doc["components"]}
    assert {"model:m", "dataset:d_g", "dataset:d_m", "dataset:d_t"} <= set(by_ref)
    teachers = {c["name"]: c for c in doc["components"] if c["name"].startswith("teacher-")}
    assert teachers["teacher-t"]["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert teachers["teacher-t2"]["licenses"][0]["license"]["name"] == "gemma-terms-of-use"
    assert teachers["teacher-t"]["hashes"] == [{"alg": "SHA-256", "content": "a" * 64}]
    assert _props(teachers["teacher-t2"], "share_of_root") == ["0.250000"]
    assert by_ref["dataset:d_g"]["type"] == "data" and by_ref["dataset:d_g"]["data"][0]["type"] == "dataset"
    # licences of the root: everything its teachers and base weights pass on
    assert {lic["license"].get("id") or lic["license"]["name"] for lic in root["licenses"]} == {"MIT", "gemma-terms-of-use"}
    # the derivation chain: s <- d_m <- m <- d_g <- teacher-t2, through `dependencies`
    deps = {d["ref"]: d["dependsOn"] for d in doc["dependencies"]}
    t2 = teachers["teacher-t2"]["bom-ref"]
    assert "dataset:d_m" in deps["model:s"] and "model:m" in deps["dataset:d_m"]
    assert "dataset:d_g" in deps["model:m"] and t2 in deps["dataset:d_g"] and deps[t2] == []
    assert _props(by_ref["dataset:d_m"], "input:teacher") == ["model:m"]
    refs = {doc["metadata"]["component"]["bom-ref"]} | set(by_ref)
    assert all(r in refs for d in doc["dependencies"] for r in [d["ref"], *d["dependsOn"]])


def test_bom_of_a_dataset_and_of_imported_data_validates(tmp_path):
    art(tmp_path, "dataset", "imp", "import", origin={"api": "openai", "license": "openai-terms"})
    data_by(tmp_path, "d_t", T)
    trained(tmp_path, "s", {"d_t": 100, "imp": 100})
    assert _bom(tmp_path, "d_t")["metadata"]["component"]["type"] == "data"
    doc = _bom(tmp_path)
    origin = next(c for c in doc["components"] if c["bom-ref"] == "origin:openai")
    assert origin["licenses"][0]["license"]["name"] == "openai-terms"


def test_api_teacher_endpoint_never_reaches_the_bom(tmp_path):
    api = {"spec": "openai:gpt-x", "weights_sha256": None, "license": "openai-terms",
           "source": "https://user:s3cret@api.example/v1"}
    data_by(tmp_path, "d_api", api)
    trained(tmp_path, "s", {"d_api": 10})
    text = json.dumps(_bom(tmp_path))
    assert "s3cret" not in text and "api.example" not in text and "openai:gpt-x" in text


def test_schema_violations_are_one_line_errors(tmp_path):
    _two_teacher_workspace(tmp_path)
    doc = _bom(tmp_path)
    doc["components"][0]["type"] = "llm"
    with pytest.raises(StillhouseError, match="invalid CycloneDX 1.6 BOM"):
        validate_cyclonedx(doc)


def test_cli_bom(tmp_path, capsys):
    _two_teacher_workspace(tmp_path)
    main(["lineage", "s", "-w", str(tmp_path), "--bom", "cyclonedx"])
    validate_cyclonedx(json.loads(capsys.readouterr().out))
    with pytest.raises(SystemExit) as e:
        main(["lineage", "s", "-w", str(tmp_path), "--bom", "spdx"])
    assert e.value.code == 2 and "unknown format 'spdx'" in capsys.readouterr().err
