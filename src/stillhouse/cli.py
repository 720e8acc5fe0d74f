"""The `stillhouse` command: a thin typer wrapper over the Python API.

Every user error (StillhouseError) is printed as one line naming the culprit, exit code 2.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from .errors import StillhouseError

app = typer.Typer(
    name="stillhouse",
    help="Distil a teacher LLM into a smaller student: data engine, KD training, pruning, evaluation, lineage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_WORKSPACE = Path("stillhouse-runs")
WorkspaceOpt = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="Where artifacts are stored.")


def _run_recipe(path: Path, workspace: Path, force: bool, resume: bool = False) -> None:
    from .api import run_recipe

    results = run_recipe(path, workspace, force=force, resume=resume)
    last = list(results.values())[-1]
    from .progress import console

    console.print(f"\nDone. Final artifact: {last.path}")
    report = last.path / "report.md"
    if report.exists():
        console.print(f"Report: {report}")
    if (last.path / "report.html").exists():
        console.print(f"HTML report: {last.path / 'report.html'}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage even if its artifact exists."),
    resume: bool = typer.Option(False, "--resume", help="Train stages continue from their latest checkpoint (checkpoint_every)."),
):
    """Run a recipe: each stage writes an artifact; existing artifacts are reused."""
    _run_recipe(recipe, workspace, force, resume)


@app.command()
def quickstart(
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
    preset: str = typer.Option("quickstart", help="Built-in recipe: quickstart (gcd, about 10 min on 2 CPU cores: 562 s in bench/quickstart.py), chain_sum (the arithmetic skill that does not generalise, docs/quickstart.md) or two_stage (docs/lineage.md)."),
):
    """Run the built-in quickstart: SmolLM2-135M's gcd answers -> verified traces -> pruned student -> KD -> eval -> report."""
    from .recipe import builtin_recipe

    _run_recipe(builtin_recipe(preset), workspace, force)


@app.command()
def generate(
    teacher: str = typer.Argument(..., help="Teacher model spec (built-in, directory, .gguf), or the model name an endpoint expects with --base-url."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="JSONL or Parquet file of prompts."),
    field: Optional[str] = typer.Option(None, help="The prompt field (default: prompt)."),
    workspace: Path = WorkspaceOpt,
    samples: int = typer.Option(1, help="Responses per prompt."),
    temperature: float = typer.Option(0.7),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    top_k_logprobs: int = typer.Option(0, "--top-k-logprobs", help="Keep the teacher's top-k log-probs per token (KD signal)."),
    dedup: str = typer.Option("off", help="off, exact or near (MinHash)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Name of the environment variable holding the API key."),
    terms: Optional[str] = typer.Option(None, help="Licence or terms id of an API teacher (for lineage), e.g. openai-terms."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the records as JSONL here."),
    force: bool = typer.Option(False, "--force", help="Regenerate even if this dataset exists."),
):
    """Teacher completions for a prompt file, without writing a recipe (a one-stage `complete` recipe)."""
    from .api import run_recipe
    from .recipe import parse_recipe

    stage = {"type": "complete", "teacher": teacher, "prompts_file": str(prompts), "samples": samples,
             "temperature": temperature, "max_new_tokens": max_new_tokens, "top_k_logprobs": top_k_logprobs, "dedup": dedup}
    stage.update({k: v for k, v in {"field": field, "system_prompt": system}.items() if v is not None})
    recipe: dict = {"name": "generate", "stages": {"completions": stage}}
    if base_url:
        api = {"backend": "openai", "base_url": base_url, "model": teacher}
        api.update({k: v for k, v in {"api_key_env": api_key_env, "terms": terms}.items() if v is not None})
        recipe["teachers"] = {"api": api}
        stage["teacher"] = "api"
    elif api_key_env or terms:
        raise StillhouseError("--api-key-env and --terms apply to an API teacher: give --base-url too")
    art = run_recipe(parse_recipe(recipe, "generate"), workspace, force=force)["completions"]
    from .progress import console

    console.print(f"\nDone. Dataset: {art.path} ({art.manifest['counts']['records']} records)")
    if out is not None:
        from .fsutil import write_text_atomic
        from .records import read_rows

        rows = read_rows(art.file("data.parquet"))
        write_text_atomic(out, "".join(json.dumps(r, default=str) + "\n" for r in rows))
        console.print(f"Wrote {len(rows)} records to {out}")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")):
    """Check a recipe without running it."""
    from .preflight import check_inputs
    from .recipe import load_recipe

    r = load_recipe(recipe)
    check_inputs(r)  # model directories and prompt files, without loading a model
    typer.echo(f"{recipe}: ok ({len(r.stages)} stages: {' -> '.join(r.order())})")


@app.command()
def show(
    artifact: str = typer.Argument(..., help="Artifact directory, id or id prefix."),
    workspace: Path = WorkspaceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest."),
):
    """Print an artifact's manifest readably."""
    from .artifacts import ArtifactStore
    from .show import render_manifest

    art = ArtifactStore(workspace).find(artifact)
    if as_json:
        typer.echo(json.dumps(art.manifest, indent=2))
    else:
        render_manifest(art)


@app.command("models")
def list_models():
    """List the built-in model names and their licences."""
    from .models import BUILTINS

    for b in BUILTINS.values():
        typer.echo(f"{b.name:24} {b.license:20} {b.description} (package {b.package})")


@app.command()
def lineage(
    artifact: str = typer.Argument(..., help="Artifact directory, id or id prefix."),
    workspace: Path = WorkspaceOpt,
    as_json: bool = typer.Option(False, "--json", help="Ancestry, teacher shares and obligations as JSON."),
    prov: bool = typer.Option(False, "--prov", help="W3C PROV-JSON (validated before it is printed)."),
    graph: Optional[Path] = typer.Option(None, "--graph", help="Write a picture: .png/.svg/.pdf (Graphviz if present, else matplotlib) or .dot."),
    from_spec: Optional[str] = typer.Option(None, "--from", help="Is this model distilled from SPEC? yes/no with paths and share (exit 1 if no)."),
    terms: bool = typer.Option(False, "--terms", help="Obligations inherited through every path, with teacher and clause."),
    card: Optional[Path] = typer.Option(None, "--card", help="Write a refreshed model card (with evaluations found in the workspace)."),
    bom: Optional[str] = typer.Option(None, "--bom", help="An AI bill of materials on stdout: cyclonedx (CycloneDX 1.6 ML-BOM, schema-validated)."),
):
    """Where an artifact came from: stages, teachers with their share of the training signal, terms."""
    from .lineage.cli import run_lineage

    code = run_lineage(artifact, workspace, as_json=as_json, prov=prov, graph=graph, from_spec=from_spec, terms=terms, card=card, bom=bom)
    if code:
        raise SystemExit(code)  # click would swallow typer.Exit's code outside standalone mode
SuiteOpt = typer.Option(..., "--suite", "-s", help="rg:TASK[,key=value..], humaneval[,size=N] or jsonl:PATH[,verifier=NAME]; repeatable.")


def _eval_settings(batch_size, speed_batch, samples, temperature, memory, perplexity):
    from .eval.config import EvalSettings

    return EvalSettings(batch_size=batch_size, speed_batches=tuple(sorted({1, speed_batch})), samples=samples,
                        temperature=temperature, ks=tuple(k for k in (1, 5, 10) if k <= samples), memory=memory,
                        perplexity_file=str(perplexity) if perplexity else None)


def _comparison(models, suite, workspace, force, teacher, **settings) -> None:
    from .eval.suites import parse_suite

    suites = [parse_suite(s) for s in suite]  # a bad suite is reported before torch is even imported
    from .eval.compare import run_comparison
    from .eval.report import load_results, print_tables, table_rows

    from rich.console import Console

    art, reused = run_comparison(list(models), suites, workspace, _eval_settings(**settings), teacher=teacher, force=force)
    stdout = Console() if sys.stdout.isatty() else Console(width=200)  # the tables are the command's output
    print_tables(table_rows(load_results(art)), ", ".join(suite), stdout)
    typer.echo(f"{'Reused' if reused else 'Wrote'} eval artifact {art.path} (report: stillhouse report {art.id} -w {workspace})")


_EVAL_OPTS = dict(
    batch_size=typer.Option(32, help="Generation batch size."),
    speed_batch=typer.Option(16, help="Decode speed is measured at batch 1 and at this batch size."),
    samples=typer.Option(1, help="Sampled completions per problem for pass@k (k = 1, 5, 10 up to this)."),
    temperature=typer.Option(0.8, help="Sampling temperature for --samples > 1."),
    memory=typer.Option(True, help="Measure each model's peak RSS in a fresh process."),
    perplexity=typer.Option(None, help="Held-out text for perplexity: .txt (blank-line separated) or .jsonl with 'text'."),
)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model spec: built-in name, directory, .gguf or artifact."),
    suite: list[str] = SuiteOpt,
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Re-evaluate even if this evaluation exists."),
    batch_size: int = _EVAL_OPTS["batch_size"], speed_batch: int = _EVAL_OPTS["speed_batch"],
    samples: int = _EVAL_OPTS["samples"], temperature: float = _EVAL_OPTS["temperature"],
    memory: bool = _EVAL_OPTS["memory"], perplexity: Optional[Path] = _EVAL_OPTS["perplexity"],
):
    """Evaluate one model on suites; the result is an eval artifact (rerunning is free)."""
    _comparison([model], suite, workspace, force, False, batch_size=batch_size, speed_batch=speed_batch,
                samples=samples, temperature=temperature, memory=memory, perplexity=perplexity)


@app.command()
def compare(
    teacher: str = typer.Argument(..., help="The teacher's model spec."),
    students: list[str] = typer.Argument(..., help="One or more student model specs."),
    suite: list[str] = SuiteOpt,
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Re-evaluate even if this comparison exists."),
    batch_size: int = _EVAL_OPTS["batch_size"], speed_batch: int = _EVAL_OPTS["speed_batch"],
    samples: int = _EVAL_OPTS["samples"], temperature: float = _EVAL_OPTS["temperature"],
    memory: bool = _EVAL_OPTS["memory"], perplexity: Optional[Path] = _EVAL_OPTS["perplexity"],
):
    """Teacher and students on the same problems: one table, students also as a fraction of the teacher."""
    _comparison([teacher, *students], suite, workspace, force, True, batch_size=batch_size, speed_batch=speed_batch,
                samples=samples, temperature=temperature, memory=memory, perplexity=perplexity)


@app.command()
def report(
    targets: list[str] = typer.Argument(..., help="Workspace directory, or eval / trained-model / report artifacts (path or id)."),
    workspace: Path = WorkspaceOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also copy report.html, report.md and the PNGs here."),
    title: Optional[str] = typer.Option(None, help="Report title."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if this report exists."),
):
    """A self-contained HTML report (and the same as Markdown) from evaluations and training runs."""
    import shutil

    from .eval.report import make_report

    art = make_report(list(targets), workspace, title=title, force=force)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in art.path.iterdir():
            if f.suffix in (".html", ".md", ".png"):
                shutil.copy2(f, out / f.name)
    where = out or art.path
    typer.echo(f"Report: {where / 'report.html'} (Markdown: {where / 'report.md'})")


@app.command()
def serve(
    model: str = typer.Argument(..., help="Model spec: built-in name, HF directory, .gguf file or hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most rows (choices) decoded together; more wait for a free row."),
    faults: Optional[str] = typer.Option(None, help="Inject faults, e.g. 429=0.1,500=0.1,slow=0.05,cut=0.05 (fractions of requests)."),
    seed: int = typer.Option(0, help="Seed of the fault injection."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="Model name clients send (default: MODEL)."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="Key file (`stillhouse keys add FILE`): every request needs one of its keys."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Tokens per request (prompt + completion); default: the model's context."),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests in flight at once; more are answered 429 with Retry-After."),
    max_tokens: int = typer.Option(256, "--default-max-tokens", help="Completion budget of a request that names no max_tokens."),
    watermark_key_env: Optional[str] = typer.Option(None, "--watermark-key-env", help="Watermark every answer with the key in this environment variable (docs/provenance.md)."),
    watermark_scheme: str = typer.Option("greenlist", "--watermark-scheme", help="greenlist (biases logits) or gumbel (distortion-free; marks sampled answers only). docs/watermark.md."),
    antidistill: Optional[Path] = typer.Option(None, "--antidistill", help="Antidistillation sampling settings (YAML; docs/watermark.md)."),
):
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from .serve import serve as run_server

    run_server(model, host=host, port=port, max_batch=max_batch, faults=faults, seed=seed, served_name=served_name,
               api_keys=str(api_keys) if api_keys else None, max_context=max_context, max_concurrent=max_concurrent,
               default_max_tokens=max_tokens, watermark_key_env=watermark_key_env, watermark_scheme=watermark_scheme,
               antidistill=str(antidistill) if antidistill else None)


# SIGTERM is handled like Ctrl-C (temporary directories removed, committed shards kept); click
# turns every KeyboardInterrupt into exit code 130, so the reason is remembered here
_terminated = threading.Event()


from .guard.cli import app as guard_app, keys_app  # noqa: E402  (the provider guard: guard/cli.py)

app.add_typer(guard_app, name="guard")
app.add_typer(keys_app, name="keys")  # the same commands as `stillhouse guard keys`: one key mechanism (apikeys.py)


def _on_sigterm(signum, frame):
    _terminated.set()
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    import signal

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # `serve` installs uvicorn's own
    try:
        _dispatch(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: Optional[list[str]]) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
        # typer turns Ctrl-C into Exit(130), which click returns (not raises) outside standalone mode
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except StillhouseError as e:
        print(f"stillhouse: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    except KeyboardInterrupt:
        what = "terminated" if _terminated.is_set() else "interrupted"
        print(f"stillhouse: {what}; finished artifacts are kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(143 if _terminated.is_set() else 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: typer printed its help to stdout and
            # left the error's message empty, so show() would print only a blank line on stderr
            print(f"stillhouse: error: '{e.ctx.command_path}' needs a command (listed in the help above)", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, _click_errors()):
            e.show()
            sys.exit(2)
        raise


def _click_errors() -> tuple[type, ...]:
    """Usage errors: click's, and those of the click copy newer typer releases vendor (not subclasses)."""
    import click

    errors: tuple[type, ...] = (click.exceptions.ClickException,)
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return errors
    return errors + (vendored.ClickException,)


if __name__ == "__main__":
    main()
