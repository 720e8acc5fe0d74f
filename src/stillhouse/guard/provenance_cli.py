"""`stillhouse guard keygen|detect|radioactivity|provenance`: watermark detection, radioactivity
and provenance tests. guard/cli.py registers these functions; nothing heavy is imported until
a command runs. Keys are
read from `--key` or, better (no key in the shell history or `ps`), `--key-env VAR`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import StillhouseError

DEFAULT_TEACHER = "smollm2-135m-instruct"
KeyOpt = typer.Option(None, "--key", "-k", help="Watermark key (hex); prefer --key-env.")
KeyEnvOpt = typer.Option(None, "--key-env", help="Environment variable holding the watermark key.")
GammaOpt = typer.Option(0.25, help="Green share of the vocabulary the text was watermarked with.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")


def _key(key: str | None, key_env: str | None) -> str:
    import os

    from .watermark import check_key

    if key_env:
        if not os.environ.get(key_env):
            raise StillhouseError(f"watermark key variable {key_env} is not set (or empty)")
        key = os.environ[key_env]
    if not key:
        raise StillhouseError("give the watermark key: --key-env VAR (or --key)")
    return check_key(key)


def _load(spec: str, role: str):
    """A model by spec; anything that fails to load is one line naming it."""
    from .. import models

    try:
        return models.load(spec)
    except StillhouseError as e:
        raise StillhouseError(f"{role} {spec} does not load: {e}") from None
    except Exception as e:  # a corrupt directory fails deep inside transformers
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StillhouseError(f"{role} {spec} does not load: {type(e).__name__}: {msg[:200]}") from None


# Which field of a .jsonl row holds the text, by what the file is: what a model wrote (never the
# row's prompt, which a log of requests also holds), prompts (a row with its answer still gives
# the prompt) or probe texts to teacher-force (any text).
ANSWER_FIELDS = ("completion", "answer", "response", "text")
PROMPT_FIELDS = ("prompt", "text")
TEXT_FIELDS = ("text", "completion", "prompt")


def _read_texts(path: Path, fields: tuple[str, ...]) -> list[str]:
    """Texts from .txt (blank-line separated) or .jsonl (the first of `fields` a row has)."""
    if not path.is_file():
        raise StillhouseError(f"file not found: {path}")
    if path.suffix == ".jsonl":
        out = [_field(path, n, row, fields) for n, row in _json_rows(path)]
    else:
        out = [t.strip() for t in path.read_text().split("\n\n") if t.strip()]
    if not out:
        raise StillhouseError(f"{path} holds no texts")
    return out


def _field(path: Path, n: int, row, fields: tuple[str, ...], what: str = "") -> str:
    """The first of `fields` that row n of a .jsonl file has, which must be a string."""
    val = next((row[k] for k in fields if isinstance(row, dict) and k in row), None)
    if not isinstance(val, str):
        raise StillhouseError(f"{path}:{n}: no string field {' / '.join(fields)}{what}")
    return val


def _json_rows(path: Path):
    """(line number, parsed row) for every non-blank line of a .jsonl file."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise StillhouseError(f"{path}:{n}: not a JSON line") from None


def _print(result: dict, as_json: bool, line: str) -> None:
    typer.echo(json.dumps(result, indent=2) if as_json else line)


def keygen():
    """Print a new random 256-bit watermark key (keep it secret; give it to serve via --watermark-key-env)."""
    from .watermark import new_key

    typer.echo(new_key())


def detect(
    text: Optional[str] = typer.Argument(None, help="The text to test (or --file)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Texts to test together: .txt (blank-line separated) or .jsonl."),
    key: Optional[str] = KeyOpt,
    key_env: Optional[str] = KeyEnvOpt,
    tokenizer: str = typer.Option(DEFAULT_TEACHER, help="The watermarking model (its tokenizer splits the text)."),
    gamma: float = GammaOpt,
    scheme: str = typer.Option("greenlist", help="The scheme the text was watermarked with: greenlist or gumbel (docs/watermark.md)."),
    streams: int = typer.Option(1, "--streams", help="gumbel: also cover samples 2..N of requests with n > 1 (p-value corrected for N)."),
    as_json: bool = JsonOpt,
):
    """Is this text watermarked with my key? z-score and p-value over distinct (previous, token) pairs."""
    from .watermark import check_scheme, detect_text

    check_scheme(scheme)
    k = _key(key, key_env)
    if (text is None) == (file is None):
        raise StillhouseError("give exactly one of TEXT or --file")
    texts = [text] if text is not None else _read_texts(file, ANSWER_FIELDS)
    tok = _load(tokenizer, "watermarking model").tokenizer
    s = detect_text(k, texts, tok, scheme, gamma, streams)
    what = f"{s.green} green" if scheme == "greenlist" else f"score {s.score:.1f}"
    _print(s.to_dict(), as_json, f"z = {s.z:.2f}, p = {s.p_value:.3g} ({what} of {s.scored} distinct pairs, {s.tokens} tokens)")


def radioactivity(
    suspect: str = typer.Argument(..., help="Suspect model spec, or (--mode api) a .jsonl/.txt of its answers collected from its API."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Probe texts: .txt or .jsonl (open: scored teacher-forced; api: prompts to answer)."),
    key: Optional[str] = KeyOpt,
    key_env: Optional[str] = KeyEnvOpt,
    teacher: str = typer.Option(DEFAULT_TEACHER, "--teacher", help="The watermarking model (its tokenizer defines the green lists)."),
    mode: str = typer.Option("open", help="open (weights: teacher-forced top-1 predictions) or api (generations)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="api mode, suspect generating: tokens per answer."),
    served: Optional[Path] = typer.Option(None, "--served", help="Texts I served watermarked (.txt/.jsonl): score only "
                                          "positions after a token that was a watermark context in them (Sander et al.'s filter)."),
    gamma: float = GammaOpt,
    as_json: bool = JsonOpt,
):
    """Was SUSPECT trained on text watermarked with my key? One-sided binomial p-value (randomised
    within one step by a keyed hash, so it is uniform under the null and reproducible)."""
    from ..teachers.hf import encode_prompt
    from . import radioactivity as ra
    from . import watermark as wm

    k = _key(key, key_env)
    if mode not in ("open", "api"):
        raise StillhouseError(f"--mode must be open or api, got {mode!r}")
    texts = _read_texts(prompts, TEXT_FIELDS if mode == "open" else PROMPT_FIELDS)
    ref_tok = _load(teacher, "watermarking model").tokenizer
    contexts = None
    if served is not None:
        contexts = ra.watermark_contexts([ref_tok(t, add_special_tokens=False)["input_ids"] for t in _read_texts(served, ANSWER_FIELDS)])
    answers_file = Path(suspect)
    if mode == "api" and answers_file.suffix in (".jsonl", ".txt") and answers_file.is_file():
        gens = [ref_tok(t, add_special_tokens=False)["input_ids"] for t in _read_texts(answers_file, ANSWER_FIELDS)]
        s = ra.score_generations(k, gens, gamma, contexts)
    else:
        lm = _load(suspect, "suspect")
        if mode == "open":
            ra.check_same_tokenizer(lm.tokenizer, ref_tok, suspect)
            s = ra.score_open_weights(k, lm.model, [encode_prompt(lm.tokenizer, t) for t in texts], lm.tokenizer.pad_token_id, gamma,
                                      contexts=contexts)
        else:
            from .provenance import answers

            gens = [ref_tok(t, add_special_tokens=False)["input_ids"] for t in answers(lm.model, lm.tokenizer, texts, max_new_tokens)]
            s = ra.score_generations(k, gens, gamma, contexts)
    _print({"mode": mode, **s.to_dict(), "p_exact_tail": wm.binomial_test(s.green, s.scored, gamma)[1]}, as_json,
           f"{mode}: z = {s.z:.2f}, p = {s.p_value:.3g} ({s.green} green of {s.scored} distinct pairs)")


def _suspect_answers(path: Path, probes: list[str] | None) -> tuple[list[str], list[str]]:
    """(probes, answers) from a file of a suspect's answers collected from its API: .jsonl rows
    {"prompt": ..., "completion": ...} (the prompts are the probes; without prompts the rows
    answer --probes or the built-in probes in order) or .txt, blank-line separated, in order."""
    if not path.is_file():
        raise StillhouseError(f"file not found: {path}")
    if path.suffix != ".jsonl":
        texts = _read_texts(path, ANSWER_FIELDS)
        return _match(path, probes, [None] * len(texts), texts)
    prompts, texts = [], []
    for n, row in _json_rows(path):
        text = _field(path, n, row, ANSWER_FIELDS, " (the suspect's answer)")
        prompt = row.get("prompt")  # row is a dict: its answer field was found
        if prompt is not None and not isinstance(prompt, str):
            raise StillhouseError(f"{path}:{n}: prompt is not a string")
        prompts.append(prompt)
        texts.append(text)
    if not texts:
        raise StillhouseError(f"{path} holds no answers")
    return _match(path, probes, prompts, texts)


def _match(path: Path, probes: list[str] | None, prompts: list, texts: list[str]) -> tuple[list[str], list[str]]:
    from . import provenance as pv

    if all(p is not None for p in prompts):
        if probes is not None and probes != prompts:
            if len(probes) != len(prompts):
                raise StillhouseError(f"{path} holds {len(prompts)} answers for {len(probes)} probes of --probes")
            bad = next(i for i, (a, b) in enumerate(zip(probes, prompts)) if a != b)
            raise StillhouseError(f"{path}: answer {bad + 1} is to another prompt than probe {bad + 1} of --probes")
        return prompts, texts
    if any(p is not None for p in prompts):
        raise StillhouseError(f"{path}: some rows have a prompt and some not")
    probes = probes if probes is not None else pv.default_probes()
    if len(texts) != len(probes):
        raise StillhouseError(f"{path} holds {len(texts)} answers for {len(probes)} probes (answer them in order; "
                              "`stillhouse guard probes` prints the built-in ones)")
    return probes, texts


def probes(n: int = typer.Option(60, "-n", help="How many of the built-in probes (at most 100).")):
    """Print the built-in provenance probes as JSON lines {"prompt": ...}: send them to a suspect's API
    (greedy, about 32 tokens each), add each answer as "completion", and give the file to `guard provenance`."""
    from . import provenance as pv

    if not 1 <= n <= 100:
        raise StillhouseError(f"-n must be 1-100, got {n}")
    for p in pv.default_probes(n):
        typer.echo(json.dumps({"prompt": p}))


# Fewer references than this: warn. On the real pairs, random reference sets of 1, 2 and 3 called
# 56%, 29% and 11% of unrelated tests derived, sets of 5 about 1% (docs/provenance.md).
FEW_REFERENCES = 5


def provenance(
    suspect: str = typer.Argument(..., help="Suspect model spec, or a .jsonl/.txt of its answers to the probes collected "
                                  "from its API (`stillhouse guard probes`); then the default statistic is likelihood-reverse."),
    parent: str = typer.Option(..., "--parent", help="The model it may derive from."),
    reference: list[str] = typer.Option(..., "--reference", "-r", help="A model unrelated to the parent; repeatable. Give 5 or more, of "
                                       "several families and as strong as the parent: with fewer, unrelated suspects "
                                       "were often called derived (docs/provenance.md); more is stricter."),
    probes: Optional[Path] = typer.Option(None, "--probes", help="Probe prompts (.txt or .jsonl); default: 60 built-in ones."),
    statistic: Optional[str] = typer.Option(None, help="likelihood-both (both directions below; the default for a "
                                            "model), likelihood or likelihood-zlib (the suspect's weights score the parent's "
                                            "and references' answers), likelihood-reverse (they score the suspect's answers; "
                                            "the default for an answers file) or agreement (the suspect's answers only); "
                                            "docs/provenance.md."),
    chars: int = typer.Option(80, help="Compare answers on their first CHARS characters."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    alpha: float = typer.Option(0.01, help="Significance level of the verdict."),
    as_json: bool = JsonOpt,
):
    """Does SUSPECT derive from PARENT? Closer to it than to unrelated references on probe prompts, with a p-value."""
    from . import provenance as pv

    answers_file = Path(suspect).suffix in (".jsonl", ".txt")
    statistic = statistic or ("likelihood-reverse" if answers_file else "likelihood-both")
    if statistic not in pv.STATISTICS:
        raise StillhouseError(f"--statistic must be one of {', '.join(pv.STATISTICS)}, got {statistic!r}")
    if chars < 1:
        raise StillhouseError(f"--chars must be at least 1, got {chars}")
    prompts = _read_texts(probes, PROMPT_FIELDS) if probes else None
    if answers_file:
        if statistic in pv.SCORED_BY_SUSPECT:
            raise StillhouseError(f"--statistic {statistic} needs the suspect's weights; for answers from its API use "
                                  "likelihood-reverse or agreement")
        prompts, mine = _suspect_answers(Path(suspect), prompts)
        v = pv.run(_load, None, parent, reference, prompts, statistic, alpha, chars, max_new_tokens, suspect_answers=mine)
    else:
        v = pv.run(_load, suspect, parent, reference, prompts or pv.default_probes(), statistic, alpha, chars, max_new_tokens)
    result = v.to_dict()
    lineage = pv.lineage_says(suspect, parent) if Path(suspect).is_dir() else None
    result["lineage_says_derived"] = lineage
    verdict = "derived from" if v.derived else "no evidence it derives from"
    what = {"agreement": "similarity to the parent's answers", "likelihood-reverse": "the parent's score of its answers"}.get(
        statistic, "its score of the parent's answers")
    line = f"{verdict} {parent} ({statistic}): p = {v.p_value:.3g} ({what} {v.parent_similarity:.2f}, " + \
        ", ".join(f"{n}: {s:.2f}" for n, s in v.reference_similarity.items()) + ")"
    if v.parts:
        line += "; " + ", ".join(f"{k} p = {q:.3g}" for k, q in v.parts.items())
    if lineage is not None:
        line += f"; lineage graph: {'derived' if lineage else 'not derived'} ({'agrees' if lineage == v.derived else 'DISAGREES'})"
    result["warnings"] = []
    if (n_refs := len(set(reference))) < FEW_REFERENCES:
        result["warnings"].append(f"{n_refs} --reference: with fewer than {FEW_REFERENCES}, unrelated real suspects "
                                  "were often called derived; give more, of several families and as strong as the parent "
                                  "(docs/provenance.md, 'How many references')")
    for w in result["warnings"]:  # on stderr too, so --json consumers and readers both see it
        typer.echo(f"stillhouse: warning: {w}", err=True)
    _print(result, as_json, line)
