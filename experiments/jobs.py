"""The experiments' job runner: each job a subprocess of its script (`SCRIPT one --out OUT --job JSON`, one torch
thread), `parallel` at a time, a job with `after` waiting for those; every finished job a row of OUT/results.jsonl,
so a killed sweep resumes where it stopped. Used by method_fidelity.py and ttd_gain.py."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def results(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["job"]: r for r in rows}


def record(out: Path, row: dict) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def run_all(script: str, out: Path, jobs: list[dict], parallel: int) -> None:
    """Run the jobs not yet in results.jsonl; stop at the first failure (its log is in OUT/logs/)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    todo = list({j["job"]: j for j in jobs if j["job"] not in results(out)}.values())  # a job named twice runs once
    running: list[tuple[subprocess.Popen, dict]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TTD_TORCH_THREADS": "1"}
    while todo or running:
        done = results(out)
        ready = [j for j in todo if all(a in done for a in j.get("after", []))]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            todo.remove(job)
            print(f"{time.strftime('%H:%M:%S')} start {job['job']}", flush=True)
            log = open(out / "logs" / f"{job['job']}.log", "w")
            proc = subprocess.Popen([sys.executable, script, "one", "--out", str(out), "--job", json.dumps(job)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, job))
        if not running:
            raise SystemExit(f"jobs wait for jobs that are not planned: {[j['job'] for j in todo]}")
        time.sleep(2)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                state = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see logs/{job['job']}.log)"
                print(f"{time.strftime('%H:%M:%S')} {state} {job['job']}", flush=True)
                if proc.returncode:
                    raise SystemExit(1)


def subcommands(doc: str, commands: dict[str, list[tuple]]) -> argparse.ArgumentParser:
    """A script's command line from a table: {command: [(flag, {add_argument keywords}) or (name,), ...]}."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, arguments in commands.items():
        parser = sub.add_parser(name)
        for flag, *options in arguments:
            parser.add_argument(flag, **(options[0] if options else {}))
    return ap


def parse_phases(doc: str, work) -> argparse.Namespace | None:
    """The command line of a job-runner script: PHASE --out OUT [--parallel N]; the internal `one` phase runs one
    job (`work(out, job)`) here and returns None."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["data", "choose", "report", "all", "table", "one"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--job", help="(internal) one job as JSON")
    ap.add_argument("--candidate", help="report: this candidate instead of the one chosen on val; choose: only these "
                    "(comma-separated)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "one":
        run_one(args.out, json.loads(args.job), lambda job: work(args.out, job))
        return None
    return args


def run_one(out: Path, job: dict, work) -> None:
    """The `one` phase: `work(job)` in this process (one torch thread), its row recorded with the wall time."""
    import torch

    torch.set_num_threads(int(os.environ.get("TTD_TORCH_THREADS", "1")))
    if job["job"] in results(out):
        return
    t0 = time.time()
    row = work(job)
    record(out, {**job, **row, "wall_s": round(time.time() - t0, 1)})


# the columns of the experiments' tables: (method, metric, header)
COLUMNS = (("pixel", "precision", "pixel P"), ("pixel", "recall", "pixel R"), ("pixel", "f1", "**pixel F1**"),
           ("image", "f1", "image F1"), ("text", "f1", "text F1"), ("noun", "f1", "noun F1"),
           ("pixel", "single_tag_share", "<= 1 tag"), ("caption", "caption_miou", "**caption mIoU**"),
           ("caption", "caption_mfpr", "mFPR"), ("caption", "caption_mfnr", "mFNR"),
           ("caption", "coverage_second", "cover 2nd"))


def table_head() -> str:
    return "| model | " + " | ".join(c[2] for c in COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS)


def cells(rows: list[dict]) -> list[str]:
    """One value per column: the value of one row, or mean ± sample standard deviation over several."""
    out = []
    for method, metric, _ in COLUMNS:
        values = [v for r in rows if (v := r["metrics"].get(method, {}).get(metric)) is not None]
        if not values:
            out.append("-")
        elif len(values) == 1:
            out.append(f"{values[0]:.1f}")
        else:
            out.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
    return out


def seed_rows(done: dict[str, dict], name: str, jobs: list[str]) -> list[str]:
    """One table line for a model run with several seeds (the finished ones of `jobs`), or none."""
    rows = [done[j] for j in jobs if j in done]
    return [f"| {name} ({len(rows)} seeds) | " + " | ".join(cells(rows)) + " |"] if rows else []
