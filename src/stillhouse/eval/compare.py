"""Several models on the same suites, teacher first: the figures behind every comparison table.

`evaluate_models` is shared by the recipe's `eval` stage and the `compare` stage
(`run_compare`). `run_comparison` (`stillhouse eval/compare`) runs a one-stage recipe of a
`compare` stage through the runner, so the result is an `eval` artifact with the runner's
caching, locking and lineage: its id hashes the models' weights, the suites' files and the
settings, and rerunning the same comparison reuses it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import StillhouseError
from ..fsutil import dir_size, write_json_atomic
from ..models import param_count
from ..records import write_rows
from ..teachers.base import SamplingParams
from ..teachers.hf import render_chat
from .measure import answer, decode_tokens_per_s, kl_to_teacher, messages_for, same_tokenizer, text_nll, time_to_first_token
from .config import EvalSettings
from .metrics import agreement, bootstrap_ci, fraction_of, mean, mean_pass_at_k, perplexity
from .suites import Suite

# Student figures also shown as a fraction of the teacher's.
RELATIVE = ("pass_at_1", "decode_tok_per_s", "decode_tok_per_s_b1", "ttft_s", "params", "disk_bytes", "peak_rss_bytes")


@dataclass
class Candidate:
    label: str
    spec: str
    role: str  # teacher | student | model
    load: Callable  # () -> LoadedModel
    artifact_id: str | None = None
    disk_path: Path | None = None
    extra: dict = field(default_factory=dict)


def read_texts(path: str) -> list[str]:
    from .suites import read_jsonl_records

    p = Path(path)
    if p.suffix == ".jsonl":
        return [r["text"] for r in read_jsonl_records(p, ["text"])]
    if not p.is_file():
        raise StillhouseError(f"perplexity text file not found: {p}")
    texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not texts:
        raise StillhouseError(f"{p}: no text")
    return texts


def preflight(spec: str, target) -> None:
    """Cheap checks that a local model will load (config parses, safetensors headers read), so a
    broken student fails before the teacher spends minutes being evaluated."""
    if not isinstance(target, Path):
        return
    try:
        from safetensors import safe_open
        from transformers import AutoConfig

        AutoConfig.from_pretrained(target)
        for f in sorted(target.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                st.keys()
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise StillhouseError(f"model '{spec}' failed to load: {type(e).__name__}: {msg}") from None


def load_candidate(c: Candidate):
    try:
        return c.load()
    except StillhouseError:
        raise
    except Exception as e:  # transformers raises many kinds for a broken directory
        msg = (str(e).strip().splitlines() or [""])[0]
        raise StillhouseError(f"model '{c.spec}' failed to load: {type(e).__name__}: {msg}") from None


def _suite_answers(lm, suite: Suite, s: EvalSettings, label: str) -> tuple[list[dict], dict]:
    greedy = answer(lm.model, lm.tokenizer, suite.records, suite.verifier, SamplingParams(max_new_tokens=suite.max_new_tokens),
                    batch_size=s.batch_size, system_prompt=s.system_prompt, label=f"{label} on {suite.name}")
    rows = [{"suite": suite.name, **r[0]} for r in greedy]
    passed = [r["passed"] for r in rows]
    lo, hi = bootstrap_ci(passed, resamples=s.bootstrap, seed=s.seed)
    m = {"pass_at_1": mean(passed), "pass_at_1_ci": [lo, hi], "n": len(rows)}
    if s.samples > 1:
        params = SamplingParams(max_new_tokens=suite.max_new_tokens, temperature=s.temperature, n=s.samples, seed=s.seed)
        sampled = answer(lm.model, lm.tokenizer, suite.records, suite.verifier, params, batch_size=s.batch_size,
                         system_prompt=s.system_prompt, label=f"{label} on {suite.name}")
        counts = [(len(rs), sum(r["passed"] for r in rs)) for rs in sampled]
        m["pass_at_k"] = {str(k): mean_pass_at_k(counts, k) for k in s.ks if k <= s.samples}
        m["samples"] = s.samples
    return rows, m


def evaluate_one(lm, suites: list[Suite], s: EvalSettings, label: str, teacher=None, teacher_rows=None) -> tuple[dict, list[dict]]:
    """Every metric for one model; with a teacher (LoadedModel and its greedy rows), closeness to it."""
    rows, per_suite = [], {}
    for suite in suites:
        r, m = _suite_answers(lm, suite, s, label)
        rows += r
        per_suite[suite.name] = m
    passed = [r["passed"] for r in rows]
    lo, hi = bootstrap_ci(passed, resamples=s.bootstrap, seed=s.seed)
    out = {"pass_at_1": mean(passed), "pass_at_1_ci": [lo, hi], "n_problems": len(rows), "suites": per_suite,
           "params": param_count(lm.model), "layers": getattr(lm.model.config, "num_hidden_layers", None)}
    if len(suites) > 1:
        out["pass_at_1_note"] = "pooled over all suites' problems"
    prompts = [render_chat(lm.tokenizer, messages_for(r, s.system_prompt)) for suite in suites for r in suite.records]
    speeds = {str(b): decode_tokens_per_s(lm.model, lm.tokenizer, prompts, batch_size=b, new_tokens=s.speed_tokens) for b in s.speed_batches}
    out["decode_tok_per_s_by_batch"] = speeds
    out["decode_tok_per_s"] = speeds[str(max(s.speed_batches))]
    out["decode_tok_per_s_b1"] = speeds.get("1")
    out["speed_batch"] = max(s.speed_batches)
    out["ttft_s"] = time_to_first_token(lm.model, lm.tokenizer, prompts[0])
    if s.perplexity_file:
        nll, n = text_nll(lm.model, lm.tokenizer, read_texts(s.perplexity_file), label=label)
        out["perplexity"], out["perplexity_tokens"] = perplexity(nll, n), n
    if teacher is not None and teacher_rows is not None:
        key = lambda r: f"{r['suite']}/{r['id']}"  # noqa: E731
        out["agreement_with_teacher"] = agreement({key(r): r["extracted"] for r in rows}, {key(r): r["extracted"] for r in teacher_rows})
        if same_tokenizer(lm.tokenizer, teacher.tokenizer):
            t_prompts = [render_chat(teacher.tokenizer, messages_for(r, s.system_prompt)) for suite in suites for r in suite.records]
            out["kl_to_teacher"] = kl_to_teacher(lm.model, teacher.model, lm.tokenizer, t_prompts,
                                                 [r["completion_ids"] for r in teacher_rows], label=label)
        else:
            out["kl_to_teacher"] = None
            out["kl_note"] = "not measured: the model's tokenizer differs from the teacher's"
    return out, rows


def evaluate_models(candidates: list[Candidate], suites: list[Suite], s: EvalSettings) -> tuple[dict, list[dict]]:
    """All candidates on the same suites; the teacher (if any) first, students compared with it."""
    from .footprint import peak_rss_bytes

    order = sorted(candidates, key=lambda c: c.role != "teacher")
    teacher_label = next((c.label for c in order if c.role == "teacher"), None)
    models, all_rows = {}, []
    teacher_lm = teacher_rows = None
    for c in order:
        lm = load_candidate(c)
        is_teacher = c.label == teacher_label
        m, rows = evaluate_one(lm, suites, s, c.label, None if is_teacher else teacher_lm, None if is_teacher else teacher_rows)
        if is_teacher:
            teacher_lm, teacher_rows = lm, rows
        del lm
        gc.collect()
        m["peak_rss_bytes"] = peak_rss_bytes(c.spec) if s.memory else None
        m["disk_bytes"] = dir_size(c.disk_path) if c.disk_path is not None and Path(c.disk_path).is_dir() else None
        models[c.label] = {"role": c.role, "spec": c.spec, "artifact": c.artifact_id, **c.extra, **m}
        all_rows += [{"model": c.label, **r} for r in rows]
    if teacher_label is not None:
        t = models[teacher_label]
        for label, m in models.items():
            if label != teacher_label:
                m["vs_teacher"] = {k: fraction_of(m.get(k), t.get(k)) for k in RELATIVE}
                m["pass_at_1_diff_ci"] = paired_diff_ci(all_rows, label, teacher_label, s)
                # the names the first reports used
                m["pass_at_1_vs_teacher"] = m["vs_teacher"]["pass_at_1"]
                m["speedup_vs_teacher"] = m["vs_teacher"]["decode_tok_per_s"]
                m["params_vs_teacher"] = m["vs_teacher"]["params"]
    results = {"suites": [su.describe() for su in suites], "teacher": teacher_label, "models": models,
               "settings": s.model_dump(mode="json")}
    return results, all_rows


def paired_diff_ci(rows: list[dict], label: str, teacher_label: str, s: EvalSettings) -> list[float]:
    """Bootstrap interval of (model pass@1 - teacher pass@1) over the same problems: if it spans 0,
    the difference may be noise."""
    teacher = {(r["suite"], r["id"]): r["passed"] for r in rows if r["model"] == teacher_label}
    diffs = [float(r["passed"]) - float(teacher[(r["suite"], r["id"])]) for r in rows if r["model"] == label]
    return list(bootstrap_ci(diffs, resamples=s.bootstrap, seed=s.seed))


def write_results(out, results: dict, rows: list[dict]) -> None:
    """results.json + outputs.parquet into an artifact being written, and the manifest's figures."""
    write_json_atomic(out.path / "results.json", results)
    write_rows(out.path / "outputs.parquet", rows)
    scalar = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    out.metrics.update({label: {k: v for k, v in r.items() if scalar(v)} for label, r in results["models"].items()})
    out.counts.update(problems=sum(su["n"] for su in results["suites"]), models=len(results["models"]))


# -- the command-line comparison as an artifact --------------------------------------------
def _label_for(spec: str, path, taken: set[str]) -> str:
    from ..artifacts import MANIFEST, Artifact

    if path is not None and (Path(path) / MANIFEST).is_file():
        base = Artifact.open(path).manifest.get("name") or Path(path).name
    else:
        base = Path(spec).stem if path is not None else spec
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def run_compare(ctx) -> None:
    """The `compare` stage: its models (the first the teacher when `first_is_teacher`) on its suites."""
    from .. import models as model_specs
    from ..artifacts import MANIFEST, Artifact
    from .suites import parse_suite

    c = ctx.config
    suites = [parse_suite(su) for su in c.suites]  # bad suites fail before any model loads
    names = [su.name for su in suites]
    if len(set(names)) != len(names):
        raise StillhouseError(f"two suites share a name: {', '.join(names)}")
    if c.perplexity_file:
        read_texts(c.perplexity_file)
    cands, taken, outside = [], set(), []
    for i, ref in enumerate(c.models):
        spec = ctx.runner.spec_of(ref)
        target, identity = model_specs.resolve(spec)
        preflight(spec, target)
        path = Path(target) if not isinstance(target, str) else None
        art_id = Artifact.open(path).id if path is not None and (path / MANIFEST).is_file() else None
        if art_id and ctx.runner.results.get(ref) is None:
            outside.append(art_id)
        role = "teacher" if c.first_is_teacher and i == 0 else ("student" if c.first_is_teacher else "model")
        # loaded fresh, not through the runner's shared copies: each is freed after its turn
        cands.append(Candidate(_label_for(spec, path, taken), spec, role, lambda spec=spec: model_specs.load(spec), art_id,
                               path, {"license": identity.license, "source": identity.source}))
    results, rows = evaluate_models(cands, suites, EvalSettings(**{f: getattr(c, f) for f in EvalSettings.model_fields}))
    write_results(ctx.out, results, rows)
    if outside:  # model artifacts from outside the recipe (a path given to the CLI): lineage follows them too
        ctx.out.extra["parents"] = sorted({*(a.id for a in ctx.inputs.values()), *outside})


def run_comparison(specs: list[str], suites: list[Suite | str], workspace: Path, settings: EvalSettings,
                   *, teacher: bool = True, force: bool = False):
    """Evaluate `specs` (the first is the teacher when `teacher`) on `suites` (suite specs, or
    Suite objects parsed from one) as a one-stage recipe; returns (artifact, reused)."""
    from .suites import parse_suite

    if not specs:
        raise StillhouseError("no model to evaluate")
    if not suites:
        raise StillhouseError("no suite given (--suite rg:TASK, humaneval or jsonl:PATH)")
    suites = [su if isinstance(su, str) else su.spec for su in suites]
    for su in suites:
        parse_suite(su)  # bad suites are named before any model loads
    if settings.perplexity_file:
        read_texts(settings.perplexity_file)
    name = "compare" if teacher else "eval"
    stage = {"type": "compare", "models": [_absolute(s) for s in specs], "suites": suites, "first_is_teacher": teacher,
             **settings.model_dump()}
    art, reused = run_one_stage(name, stage, workspace, force)
    return art, reused


def _absolute(spec: str) -> str:
    """A model path as an absolute path (a recipe takes any path; a bare name stays a built-in or hub id)."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def run_one_stage(name: str, stage: dict, workspace: Path, force: bool = False):
    """Run a recipe of one stage named `name` (also the recipe's name) through the runner;
    returns (its artifact, whether it already existed)."""
    from ..recipe import parse_recipe
    from ..runner import Runner

    runner = Runner(parse_recipe({"name": name, "stages": {name: stage}}, name), Path(workspace), force=force)
    existed = not force and runner.existing(name) is not None
    return runner.run()[name], existed
