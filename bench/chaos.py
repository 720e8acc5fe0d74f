"""Chaos: kill -9 at seeded random points (and deliberately in the finish windows) across a
generation run (hf and openai backends) and a training run, rerunning after each kill; API
faults of every kind; a full disk. Prints one JSON line per scenario and a summary table.

    .venv/bin/python bench/chaos.py [--kills 20] [--seed 0] [--faults 0.3] [--disk-full 3]

Each scenario first runs uninterrupted (the reference), then again under kills: a `stillhouse
run` child is SIGKILLed at a random point (after a random number of committed units or
checkpoints plus a random delay, so the points do not depend on the machine's speed) and
rerun until it finishes. Checked after every kill: no half artifact is visible (every
directory in view has a valid manifest). Checked at the end: the dataset is identical record
for record to the reference (0 lost, 0 duplicated), the trained model's final loss is within
tolerance of the reference. The accounting scenario runs a fresh artifact against its own fault
server and reconciles the manifest's billed answers with the server's list, answer by answer.
Disk-full trials need root (a small tmpfs). tests/test_chaos.py runs a few kills of each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from stillhouse.artifacts import MANIFEST, ArtifactStore, read_manifest  # noqa: E402
from stillhouse.records import read_rows  # noqa: E402

FINISH_WINDOWS = ("dataset-merged", "before-rename", "after-rename", "mid-tidy")
LOSS_TOLERANCE = 0.01  # relative: a resumed run replays the same batches from the same states
FAULT_KINDS = ("429", "500", "slow", "cut", "nonjson", "nochoices", "wrongn")


def tiny_model(root: Path) -> Path:
    """The tests' tiny random llama (tests/conftest.py), saved as safetensors."""
    from conftest import build_tiny_model, build_tokenizer

    out = root / "tiny-llama"
    if not (out / "config.json").is_file():
        tok = build_tokenizer()
        build_tiny_model(tok).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    return out


def write_recipe(root: Path, name: str, teacher: dict, prompts: int, shard: int, train: bool = False,
                 temperature: float = 0.8) -> Path:
    """A complete stage (and optionally a train stage on its output)."""
    pfile = root / f"{name}-prompts.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(prompts)))
    stages = {"answers": {"type": "complete", "teacher": "teacher", "prompts_file": str(pfile), "samples": 2,
                          "temperature": temperature, "max_new_tokens": 8, "batch_size": 4, "shard_size": shard}}
    if train:
        stages["student"] = {"type": "train", "student": "teacher", "data": "answers", "epochs": 3, "batch_size": 4,
                             "sft_weight": 1.0, "kd_weight": 0.0, "lr": 1e-3, "checkpoint_every": 1}
    recipe = {"name": name, "stages": stages, **teacher}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def env(cache: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "STILLHOUSE_QUIET": "1",
            "STILLHOUSE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def spawn(recipe: Path, ws: Path, cache: Path, *args: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "run", str(recipe), "-w", str(ws), *args],
                            env=env(cache, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def half_artifacts(ws: Path) -> list[str]:
    """Directories in view that are not complete artifacts (must always be empty)."""
    bad = []
    for kind in ("dataset", "model"):
        for d in (ws / kind).iterdir() if (ws / kind).is_dir() else []:
            if d.name.startswith("."):
                continue
            try:
                read_manifest(d / MANIFEST, d.name)
            except Exception:
                bad.append(str(d))
    return bad


def progress(ws: Path) -> int:
    """Committed units plus checkpoints written so far (what a random kill point waits for)."""
    units = len(list(ws.glob("dataset/.*.partial/shards/unit-*.json")))
    ckpts = len(list(ws.glob("checkpoints/*/*/step-*/state.pt")))
    return units + ckpts


def kill_at_random(proc: subprocess.Popen, ws: Path, rng: random.Random, span: int) -> bool:
    """SIGKILL after a seeded random amount of progress plus a random delay; False if it finished first."""
    target, delay = rng.randint(0, span), rng.uniform(0, 0.5)
    while proc.poll() is None and progress(ws) < target:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def run_to_end(recipe: Path, ws: Path, cache: Path, *args: str) -> None:
    proc = spawn(recipe, ws, cache, *args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a rerun failed (exit {proc.returncode}): {err[-3000:]}")


def chaos_run(recipe: Path, ws: Path, cache: Path, rng: random.Random, kills: int, span: int, check, windows=(),
              resume=False) -> dict:
    """A kill in each finish window (a fresh workspace each, then a rerun), then `kills` kills at
    random points in one workspace, rerunning after each; `check(ws)` judges every finished result."""
    args = ("--resume",) if resume else ()
    window_kills, half, failed_checks = 0, [], 0
    for point in windows:  # deliberately placed: the rerun must accept the finished work
        shutil.rmtree(ws, ignore_errors=True)
        proc = spawn(recipe, ws, cache, *args, STILLHOUSE_CRASH_AT=point)
        proc.communicate()
        window_kills += proc.returncode == -signal.SIGKILL
        half += half_artifacts(ws)
        run_to_end(recipe, ws, cache, *args)
        failed_checks += not check(ws)
    shutil.rmtree(ws, ignore_errors=True)
    random_kills = 0
    while random_kills < kills:
        proc = spawn(recipe, ws, cache, *args)
        if kill_at_random(proc, ws, rng, span):
            random_kills += 1
            half += half_artifacts(ws)
        else:  # finished before the kill point: judge it, start again for the next point
            proc.communicate()
            failed_checks += not check(ws)
            shutil.rmtree(ws)
    run_to_end(recipe, ws, cache, *args)
    failed_checks += not check(ws)
    return {"kills": window_kills + random_kills, "window_kills": window_kills, "half_artifacts_seen": len(half),
            "failed_checks": failed_checks}


def compare(reference: list[dict], rows: list[dict]) -> dict:
    ids, ref_ids = [r["id"] for r in rows], [r["id"] for r in reference]
    return {"records": len(rows), "reference_records": len(reference), "lost": len(set(ref_ids) - set(ids)),
            "duplicated": len(ids) - len(set(ids)), "identical": rows == reference}


def dataset_rows(ws: Path) -> list[dict]:
    arts = [a for a in ArtifactStore(ws).all() if a.kind == "dataset"]
    return read_rows(arts[0].file("data.parquet"))


def scenario_hf(root: Path, rng: random.Random, kills: int, windows=FINISH_WINDOWS, prompts: int = 24) -> dict:
    model = tiny_model(root)
    recipe = write_recipe(root, "hf", {"models": {"teacher": str(model)}}, prompts, 2)
    ref_ws = root / "hf-ref"
    p = spawn(recipe, ref_ws, root / "cache-ref")
    p.communicate()
    reference = dataset_rows(ref_ws)
    out = chaos_run(recipe, root / "hf-ws", root / "cache-hf", rng, kills, prompts // 2,
                    lambda ws: dataset_rows(ws) == reference, windows)
    return {"scenario": "generation (hf backend)", **out, **compare(reference, dataset_rows(root / "hf-ws"))}


@contextmanager
def server(model: Path, faults: str | None, seed: int):
    from stillhouse.serve import ServerThread, build_app

    os.environ["STILLHOUSE_QUIET"] = "1"
    app = build_app(str(model), served_name="tiny", faults=faults, seed=seed, max_batch=8)
    with ServerThread(app) as url:
        yield url, app


def fault_spec(rate: float) -> str:
    each = rate / len(FAULT_KINDS)
    return ",".join(f"{k}={each:.4f}" for k in FAULT_KINDS) + ",retry_after=0.2,slow_s=6"


def scenario_openai(root: Path, rng: random.Random, kills: int, rate: float, prompts: int = 24) -> dict:
    """Faults without kills (accounting exact), then faults with kills (every record once)."""
    model = tiny_model(root)
    teacher = lambda url: {"teachers": {"teacher": {  # noqa: E731
        "backend": "openai", "base_url": url, "model": "tiny", "terms": "apache-2.0", "max_concurrency": 4,
        "timeout": 3, "max_retries": 40, "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}}}
    with server(model, None, 0) as (url, _):
        # greedy: a server's sampled answers depend on how it batched concurrent requests
        ref = write_recipe(root, "api-ref", teacher(url), prompts, 2, temperature=0.0)
        p = spawn(ref, root / "api-ref", root / "cache-api-ref")
        p.communicate()
        reference = dataset_rows(root / "api-ref")
    results = {}
    for label, n_kills in (("faults", 0), ("faults+kills", kills)):
        with server(model, fault_spec(rate), rng.randint(0, 10**6)) as (url, app):
            recipe = write_recipe(root, f"api-{n_kills}", teacher(url), prompts, 2, temperature=0.0)
            ws = root / f"api-ws-{n_kills}"
            out = chaos_run(recipe, ws, root / f"cache-api-{n_kills}", rng, n_kills, prompts // 2,
                            lambda w: dataset_rows(w) == reference)
            stats = app.state.stats
            usage = next(a for a in ArtifactStore(ws).all() if a.kind == "dataset").manifest["metrics"]["teacher_usage"]["teacher"]
            injected = sum(stats["faults"].values())
            results[label] = {
                "scenario": f"generation (openai backend, {rate:.0%} faults{', kills' if n_kills else ''})", **out,
                **compare(reference, dataset_rows(ws)),
                "server_requests": stats["requests"], "faults_injected": injected, "faults": stats["faults"]}
            if n_kills:  # a run that finished before its kill point was discarded and rerun from the response
                continue  # cache, so the server saw more than the last artifact: scenario_accounting counts that
            results[label] |= {
                "client_requests": usage["requests"], "client_failures": usage["failures"],
                "billed_completion_tokens": usage["billed_completion_tokens"],
                "server_reported_completion_tokens": stats.get("reported_completion_tokens", 0),
                # slow answers outlive the client's timeout here: reported by the server, never read
                "timed_out_completion_tokens": stats.get("fault_tokens", {}).get("slow", {}).get("completion", 0),
                "timed_out_prompt_tokens": stats.get("fault_tokens", {}).get("slow", {}).get("prompt", 0),
                "server_served_completion_tokens": stats.get("served_completion_tokens", 0),
                "received_completion_tokens": usage["completion_tokens"], "cost_usd": usage["cost_usd"],
                "billed_prompt_tokens": usage["billed_prompt_tokens"],
                "server_reported_prompt_tokens": stats.get("reported_prompt_tokens", 0),
            }
    return results


def scenario_accounting(root: Path, rng: random.Random, kills: int, rate: float, prompts: int = 32) -> dict:
    """Teacher accounting after kills, on a fresh artifact: one fault server (its own count), one
    workspace and response cache never reused or discarded; kill -9 at seeded points before the
    last unit, rerun after each, then run to the end.

    Reconciled answer by answer: every answer the server reported a usage for is either in the
    manifest's ledger (billed) or explained: a slow answer the client stopped waiting for (each
    outlives the client's timeout here) or an answer in flight when its process was killed (sent
    to a process that then died before it could write it down; a metered API bills it, no client
    can know). `unexplained` must be 0, and the manifest's billed tokens and cost must equal the
    server's reported ones less the explained ones; received tokens likewise for well-formed answers."""
    model = tiny_model(root)
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    shard = 2
    units = prompts // shard
    with server(model, fault_spec(rate), rng.randint(0, 10**6)) as (url, app):
        teacher = {"teachers": {"teacher": {"backend": "openai", "base_url": url, "model": "tiny", "terms": "apache-2.0",
                                            "max_concurrency": 4, "timeout": 3, "max_retries": 40, "price": price}}}
        recipe = write_recipe(root, "acct", teacher, prompts, shard, temperature=0.0)
        ws, cache = root / "acct-ws", root / "cache-acct"
        killed_spans, half, done = [], [], False  # (start, end) of each killed process, monotonic
        while len(killed_spans) < kills and not done:
            t0 = time.monotonic()
            proc = spawn(recipe, ws, cache)
            target, delay = rng.randint(0, units - 1), rng.uniform(0, 0.5)
            while proc.poll() is None and progress(ws) < target:
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                time.sleep(0.5)  # the server may still finish an answer the dead process asked for
                killed_spans.append((t0, time.monotonic()))
                half += half_artifacts(ws)
            else:  # finished before this kill point: no more kills, keep the artifact
                done = proc.returncode == 0
        if not done:
            run_to_end(recipe, ws, cache)
        stats = app.state.stats
    art = next(a for a in ArtifactStore(ws).all() if a.kind == "dataset")
    usage = art.manifest["metrics"]["teacher_usage"]["teacher"]
    ledger = [json.loads(ln) for ln in (art.path / "teacher_usage" / "teacher.jsonl").read_text().splitlines()
              if ln.endswith("}")]
    billed_ids = [d["answer"] for d in ledger if "answer" in d]
    answers = stats.get("reported_answers", [])
    slow = [a for a in answers if a["id"] not in billed_ids and a["fault"] == "slow"]
    in_flight = [a for a in answers if a["id"] not in billed_ids and a["fault"] != "slow"
                 and any(t0 <= a["t"] <= t1 for t0, t1 in killed_spans)]
    explained = {a["id"] for a in slow + in_flight}
    unexplained = [a for a in answers if a["id"] not in billed_ids and a["id"] not in explained]
    total = lambda group, side: sum(a[side] for a in group)  # noqa: E731
    server_billed = {side: total(answers, side) - total(slow + in_flight, side) for side in ("prompt", "completion")}
    usable = [a for a in answers if a["fault"] in (None, "slow") and a["id"] not in explained]
    server_cost = (server_billed["prompt"] * price["input_per_mtok"] + server_billed["completion"] * price["output_per_mtok"]) / 1e6
    rows = dataset_rows(ws)
    got = (usage["billed_prompt_tokens"], usage["billed_completion_tokens"], usage["prompt_tokens"], usage["completion_tokens"])
    want = (server_billed["prompt"], server_billed["completion"], total(usable, "prompt"), total(usable, "completion"))
    return {
        "scenario": f"accounting after kills (openai backend, {rate:.0%} faults, fresh artifact)", "kills": len(killed_spans),
        "half_artifacts_seen": len(half), "records": len(rows), "expected_records": prompts * 2,
        "duplicated": len(rows) - len({r["id"] for r in rows}),
        "server_requests": stats["requests"], "client_requests": usage["requests"], "faults": stats["faults"],
        "server_reported_answers": len(answers), "billed_answers": len(billed_ids),
        "billed_answers_unknown_to_server": len(set(billed_ids) - {a["id"] for a in answers}),
        "timed_out_answers": len(slow), "in_flight_at_kill_answers": len(in_flight),
        "in_flight_at_kill_completion_tokens": total(in_flight, "completion"), "unexplained_answers": len(unexplained),
        "billed_prompt_tokens": got[0], "server_billed_prompt_tokens": want[0],
        "billed_completion_tokens": got[1], "server_billed_completion_tokens": want[1],
        "received_prompt_tokens": got[2], "server_usable_prompt_tokens": want[2],
        "received_completion_tokens": got[3], "server_usable_completion_tokens": want[3],
        "cached_responses": usage["cached_responses"],
        "cost_usd": usage["cost_usd"], "server_cost_usd": round(server_cost, 9),
        # generated but never readable by any client (cut, non-JSON): what a metered API may also bill
        "served_unreadable_completion_tokens": stats.get("served_completion_tokens", 0) - total(answers, "completion"),
        "exact": got == want and not unexplained and abs(usage["cost_usd"] - server_cost) < 1e-9,
    }


def scenario_train(root: Path, rng: random.Random, kills: int, prompts: int = 12) -> dict:
    model = tiny_model(root)
    recipe = write_recipe(root, "train", {"models": {"teacher": str(model)}}, prompts, 4, train=True)
    ref_ws = root / "train-ref"
    p = spawn(recipe, ref_ws, root / "cache-train-ref")
    p.communicate()
    ref_model = next(a for a in ArtifactStore(ref_ws).all() if a.kind == "model")
    steps = ref_model.manifest["metrics"]["steps"]
    ws = root / "train-ws"
    ref_loss = ref_model.manifest["metrics"]["final_loss"]

    def close(w: Path) -> bool:
        m = next(a for a in ArtifactStore(w).all() if a.kind == "model").manifest["metrics"]
        return m["steps"] == steps and abs(m["final_loss"] - ref_loss) <= LOSS_TOLERANCE * abs(ref_loss)

    out = chaos_run(recipe, ws, root / "cache-train", rng, kills, steps + prompts // 4, close, windows=("model-saved",),
                    resume=True)
    got = next(a for a in ArtifactStore(ws).all() if a.kind == "model").manifest["metrics"]
    loss = got["final_loss"]
    return {"scenario": "training (checkpoint every step, --resume)", **out, "steps": got["steps"], "reference_steps": steps,
            "final_loss": loss, "reference_final_loss": ref_loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
            "spent_checkpoints_left": len(list((ws / "checkpoints").glob("*"))) if (ws / "checkpoints").exists() else 0}


def scenario_disk_full(root: Path, trials: int, rng: random.Random) -> dict:
    """A small tmpfs filled to a random few KB mid-run; the rerun after freeing space must finish."""
    if os.geteuid() != 0:
        return {"scenario": "disk full", "skipped": "needs root for a tmpfs"}
    model = tiny_model(root)
    recipe = write_recipe(root, "disk", {"models": {"teacher": str(model)}}, 16, 2)
    ref_ws = root / "disk-ref"
    spawn(recipe, ref_ws, root / "cache-disk-ref").communicate()
    reference = dataset_rows(ref_ws)
    ok = one_line = 0
    for t in range(trials):
        ws = root / f"disk-{t}"
        ws.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ws)], check=True)
        try:
            st = os.statvfs(ws)
            leave = rng.randint(4, 48) * 1024
            (ws / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
            p = spawn(recipe, ws, root / f"cache-disk-{t}")
            _, err = p.communicate()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            one_line += p.returncode == 2 and len(lines) == 1 and "no space left" in lines[0] and not list(ws.rglob("*.tmp"))
            (ws / "filler").unlink()
            p = spawn(recipe, ws, root / f"cache-disk-{t}")
            p.communicate()
            ok += p.returncode == 0 and dataset_rows(ws) == reference
        finally:
            subprocess.run(["umount", "-l", str(ws)], check=True)
    return {"scenario": "disk full (tmpfs, a few KB left)", "trials": trials, "one_line_error": one_line, "rerun_identical": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="random kill points in all (split hf/openai/train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", type=float, default=0.3, help="fraction of API requests answered with a fault")
    ap.add_argument("--disk-full", type=int, default=3, help="disk-full trials (root only)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="stillhouse-chaos-"))
    per = max(1, a.kills // 3)
    show = lambda r: print(json.dumps(r), flush=True)  # noqa: E731  (one line per scenario as it ends)
    show(scenario_hf(root, rng, per))
    for r in scenario_openai(root, rng, per, a.faults).values():
        show(r)
    show(scenario_accounting(root, rng, per, a.faults))
    show(scenario_train(root, rng, a.kills - 2 * per))
    show(scenario_disk_full(root, a.disk_full, rng))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
