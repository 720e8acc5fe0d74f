"""`stillhouse generate`: teacher completions for a prompt file without a recipe, local or over an API."""

from __future__ import annotations

import json

import pytest

from stillhouse.cli import main
from stillhouse.records import read_rows
from stillhouse.artifacts import ArtifactStore


def _prompts(tmp_path, n=4):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(n)))
    return path


def _exit(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_generate_with_a_local_teacher_writes_a_dataset_and_jsonl(tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    main(["generate", str(tiny_model_dir), "--prompts", str(_prompts(tmp_path)), "-w", str(tmp_path / "ws"),
          "--samples", "2", "--max-new-tokens", "4", "--system", "Be terse.", "--top-k-logprobs", "2", "--out", str(out)])
    art = ArtifactStore(tmp_path / "ws").all()[0]
    rows = read_rows(art.file("data.parquet"))
    assert len(rows) == 8 and art.manifest["stage"] == "complete"
    assert all("Be terse." in r["prompt"] and len(r["topk_ids"][0]) == 2 for r in rows)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in rows]
    assert lines[0]["teacher"] == str(tiny_model_dir) and lines[0]["backend"] == "hf"


def test_generate_through_an_openai_compatible_endpoint(tmp_path, tiny_model_dir, monkeypatch):
    from stillhouse.serve import ServerThread, build_app

    app = build_app(str(tiny_model_dir), served_name="tiny")
    monkeypatch.setenv("SH_GEN_KEY", "sk-" + "x" * 20)
    with ServerThread(app) as url:
        main(["generate", "tiny", "--prompts", str(_prompts(tmp_path, 3)), "-w", str(tmp_path / "ws"), "--base-url", url,
              "--api-key-env", "SH_GEN_KEY", "--terms", "apache-2.0", "--max-new-tokens", "4"])
    art = ArtifactStore(tmp_path / "ws").all()[0]
    rows = read_rows(art.file("data.parquet"))
    assert len(rows) == 3 and {r["backend"] for r in rows} == {"openai"}
    assert app.state.stats["requests"] >= 3
    assert "sk-xxxx" not in (art.path / "manifest.json").read_text()


def test_generate_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    ws = tmp_path / "ws"
    assert _exit(["generate", str(tiny_model_dir), "--prompts", str(tmp_path / "nope.jsonl"), "-w", str(ws)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jsonl" in err
    assert _exit(["generate", "no-such-model", "--prompts", str(_prompts(tmp_path)), "-w", str(ws)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert _exit(["generate", str(tiny_model_dir), "--prompts", str(_prompts(tmp_path)), "-w", str(ws), "--terms", "x"]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert not (ws / "dataset").exists() or not any((ws / "dataset").iterdir())  # nothing half-written
