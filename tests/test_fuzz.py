"""Fuzz: recipes, imported files (JSONL, Parquet), model specs and CLI arguments. Every input
either works or gets a one-line error with exit 2: never a traceback, never a partial artifact.
Example counts are bounded (FUZZ_EXAMPLES) and there is no deadline, so the suite stays fast
and nothing depends on the machine's speed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillhouse import models
from stillhouse.cli import main
from stillhouse.errors import StillhouseError

FUZZ_EXAMPLES = int(os.environ.get("STILLHOUSE_FUZZ_EXAMPLES", "30"))
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

STAGE_TYPES = ["tasks", "complete", "train", "prune", "eval", "report", "import", "mix", "rejection", "preference", "bogus"]
FIELDS = ["teacher", "student", "data", "tasks", "prompts_file", "task", "samples", "epochs", "batch_size", "lr",
          "max_new_tokens", "shard_size", "too_long", "train", "eval", "path", "tokenizer", "layers", "model"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["t", "a", "b", "chain_sum", "/nonexistent", "truncate", "refuse", "", "..", "smollm2"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                      max_leaves=6)
stage = st.fixed_dictionaries({"type": st.sampled_from(STAGE_TYPES)}, optional={f: values for f in FIELDS})
recipes = st.one_of(
    st.fixed_dictionaries({"name": st.one_of(st.text(max_size=8), scalars),
                           "stages": st.dictionaries(st.sampled_from(["a", "b", "c"]), stage, max_size=3)},
                          optional={"models": st.dictionaries(st.text(max_size=4), scalars, max_size=2),
                                    "teachers": st.dictionaries(st.text(max_size=4), values, max_size=2)}),
    values,
)


def cli(capsys, args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in this process; any exception other than an exit fails."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return code, capsys.readouterr().err


def assert_clean(code: int, err: str, allowed=(0, 2)) -> None:
    assert code in allowed, (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines, f"exit 2 with nothing on stderr: {err!r}"
        assert len(lines) == 1 or lines[-1].startswith(("stillhouse: error:", "Error:")) or "Usage:" in err, err


def no_partial_artifact(ws: Path) -> None:
    for kind in ("dataset", "model"):
        for d in (ws / kind).iterdir() if (ws / kind).is_dir() else []:
            assert not d.name.endswith(".partial") or d.name.count(".") == 2, d  # a resumable work dir only
            assert d.name.startswith(".") or (d / "manifest.json").is_file(), f"half artifact {d}"


@fuzz
@given(recipe=recipes)
def test_fuzzed_recipes_validate_or_fail_in_one_line(recipe, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert_clean(*cli(capsys, ["validate", str(path)]))


@fuzz
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_fuzzed_recipe_files_validate_or_fail_in_one_line(text, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        assert_clean(*cli(capsys, ["validate", str(path)]))


row_values = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(0, 5), max_size=3), st.booleans())
rows = st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "question", "answer", "id", "x"]), row_values, max_size=4),
                max_size=4)


@settings(max_examples=max(5, FUZZ_EXAMPLES // 3), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=rows, as_parquet=st.booleans(), garbage=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_imports_work_or_fail_in_one_line_without_a_partial_artifact(data, as_parquet, garbage, tiny_model_dir, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / ("in.parquet" if as_parquet else "in.jsonl")
        if garbage is not None:
            src.write_bytes(garbage)
        elif as_parquet:
            try:
                pq.write_table(pa.Table.from_pylist(data), src)
            except (pa.ArrowException, ValueError):
                src.write_bytes(b"")  # rows Arrow cannot type: an empty file instead
        else:
            src.write_text("".join(json.dumps(r) + "\n" for r in data))
        recipe = tmp / "r.yaml"
        recipe.write_text(yaml.safe_dump({"name": "imp", "models": {"t": str(tiny_model_dir)},
                                          "stages": {"imp": {"type": "import", "path": str(src), "tokenizer": "t"}}}))
        ws = tmp / "ws"
        assert_clean(*cli(capsys, ["run", str(recipe), "-w", str(ws)]))
        no_partial_artifact(ws)


@fuzz
@given(spec=st.one_of(st.text(max_size=30), st.sampled_from(["/", ".", "..", "~", "x.gguf", "/nonexistent/m", "a/b/c", "a/b",
                                                          "smollm2", "gemma3", "", " ", "\x00"])))
def test_fuzzed_model_specs_resolve_or_fail_in_one_line(spec):
    try:
        models.resolve(spec)
    except StillhouseError as e:
        assert len(str(e).splitlines()) == 1, str(e)


@pytest.mark.parametrize("spec", ["\n", "a\nb", "x\n.gguf", "./a\u2028b", "m\x85"])
def test_a_model_spec_with_a_line_break_is_shown_escaped_on_one_line(spec):
    """Found by the fuzz at 1,000 examples: the spec was quoted raw, newline and all."""
    with pytest.raises(StillhouseError) as e:
        models.resolve(spec)
    assert len(str(e.value).splitlines()) == 1 and repr(spec) in str(e.value)


COMMANDS = ["show", "validate", "models", "lineage", "keys", "generate", "eval", "compare", "report", "--help", "nonsense"]
ARGS = ["--json", "-w", "--workspace", "x", "x.yaml", "--force", "--samples", "-1", "0", "abc", "", "list", "add", "revoke",
        "--prompts", "p.jsonl", "--base-url", "http://127.0.0.1:9/v1", "--from", "--temperature", "nan", "--dedup", "near"]


@fuzz
@given(argv=st.tuples(st.sampled_from(COMMANDS), st.lists(st.sampled_from(ARGS), max_size=5)))
def test_fuzzed_cli_arguments_never_raise_a_traceback(argv, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # relative paths land here, nothing outside
        try:
            (Path(tmp) / "p.jsonl").write_text('{"prompt": "hi"}\n')
            code, err = cli(capsys, [argv[0], *argv[1]])
        finally:
            os.chdir(cwd)
    assert_clean(code, err, allowed=(0, 1, 2))  # 1: `lineage --from` answering "no"


@pytest.mark.parametrize("argv", [[], ["keys"], ["guard"], ["guard", "keys"]])
def test_a_bare_command_group_shows_its_help_and_names_the_missing_command(argv, capsys):
    """Found by the fuzz (`keys` alone): typer printed the help on stdout and the CLI then printed
    only a blank line on stderr with exit 2."""
    code, err = cli(capsys, argv)
    assert code == 2 and "needs a command" in err
    assert_clean(code, err)


@pytest.mark.parametrize("spec", ["~0", "~nosuchuser/m", "~nosuchuser/x.gguf"])
def test_a_path_under_an_unknown_users_home_is_a_one_line_error(spec):
    """Found by the fuzz at 1,000 examples: pathlib's expanduser raised a bare RuntimeError."""
    with pytest.raises(StillhouseError, match="no home directory"):
        models.resolve(spec)
