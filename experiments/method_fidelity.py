"""Issue 15's experiment: defaults chosen on TagMask-Synth's validation split, figures reported on its eval split.

Phases (each idempotent: a job whose row is already in OUT/results.jsonl is skipped, so a killed run resumes):

  data    `ttd synth` train 2000 / val 500 / eval 500 (seed 0, the 200-class world of the earlier tables), then parse
          and score the train split with the embedded base model (the pseudo-labels).
  choose  on val: the base model at selection thresholds 0.3-0.7, and TTD (seed 0) with the two L_tag forms: the
          session-3 default (`teacher` targets, trained through sclip with one prompt) and the paper's (`paper`: each
          tag's own normalised map or zero, through the head and prompts that made the pseudo-labels); the
          default form on pseudo-labels selected at the base's best validation threshold (0.4), evaluated there;
          and, at 0.4, trained through maskclip instead of sclip.
  report  on eval: the base model, the chosen TTD configuration and the contrastive-only control, 3 seeds each.
  table   the Markdown tables for docs/BENCHMARKS.md, from results.jsonl.

    .venv/bin/python experiments/method_fidelity.py all --out OUT        # about 80 minutes on 2 cores
    .venv/bin/python experiments/method_fidelity.py table --out OUT

Jobs run as subprocesses of this script, `--parallel` at a time (one torch thread each).
"""

from __future__ import annotations

from pathlib import Path

from jobs import cells, parse_phases, results, run_all, seed_rows, table_head  # experiments/jobs.py, beside this script

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SEEDS = (0, 1, 2)
# compared on val: the two L_tag forms, and the selection threshold of the pseudo-labels (and of the evaluation);
# every other setting is DistillConfig's default
CANDIDATES = {
    "ttd-teacher": {"tag_target": "teacher", "head": "sclip"},
    "ttd-paper": {"tag_target": "paper", "head": "scoring", "templates": None},
    "ttd-teacher-t0.4": {"tag_target": "teacher", "head": "sclip"},
    "ttd-maskclip-t0.4": {"tag_target": "teacher", "head": "maskclip"},  # re-checks session 3's choice of head
}
# the pseudo-labels' (and the evaluation's) threshold where not 0.5
THRESHOLD = {"ttd-teacher-t0.4": 0.4, "ttd-maskclip-t0.4": 0.4}
CONTROL = {"w_distill": 0.0, "w_tag": 0.0, "w_contrastive": 1.0}
# DistillConfig's defaults of session 7 that have changed since (the union binarised in session 10, refreshed
# targets in session 12, L_tag weight 2 in session 13): pinned, so these figures reproduce
SESSION7_DEFAULTS = {"union_threshold": None, "w_tag": 1.0, "refresh_rounds": 0}
CANDIDATES = {name: {**SESSION7_DEFAULTS, **settings} for name, settings in CANDIDATES.items()}
CONTROL = {**SESSION7_DEFAULTS, **CONTROL}


# ---------------------------------------------------------------- one job, in its own process

def store_for(out: Path, threshold: float) -> Path:
    """The pseudo-labels' store: one per selection threshold."""
    return out / "store" if threshold == 0.5 else out / f"store-t{threshold}"


def job_data(out: Path, threshold: float = 0.5) -> dict:
    from ttd.configs import ParseConfig, ScoreConfig
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score
    from ttd.synth.generate import SynthConfig, synthesize

    synth = out / "synth"
    if not (synth / "synth.json").exists():
        # the world of the session-7 tables: multi-object captions (the default before the CC3M-calibrated style)
        synthesize(str(synth), train=2000, val=500, eval=500, seed=0,
                   config=SynthConfig(train_style="multi_object", eval_style="multi_object"))
    store = str(store_for(out, threshold))
    run_parse(str(synth / "train"), store, ParseConfig())
    summary = run_score(str(synth / "train"), store, ScoreConfig(threshold=threshold), workers=0)
    return {"images": summary["images"], "tags": summary["tags"], "masks": summary["masks"]}


def job_distill(out: Path, name: str, seed: int, settings: dict, threshold: float = 0.5) -> dict:
    from ttd.configs import DistillConfig
    from ttd.stages.distill import run_distill

    summary = run_distill(str(out / "synth" / "train"), str(store_for(out, threshold)),
                          str(out / "runs" / f"{name}-s{seed}"), DistillConfig(**settings), seed=seed)
    return {"seconds": summary.get("seconds"), "final": summary.get("final")}


def job_evaluate(out: Path, split: str, lora: str | None, threshold: float) -> dict:
    from ttd.configs import ScoreConfig, TagmaskEvalConfig
    from ttd.eval.tagmask import run_tagmask_eval

    config = TagmaskEvalConfig(score=ScoreConfig(threshold=threshold))
    summary = run_tagmask_eval(str(out / "synth" / split), str(out / "evalstore"), config,
                               lora=str(out / "runs" / lora) if lora else None)
    return {"metrics": summary["metrics"]}


def work(out: Path, job: dict) -> dict:
    kind = job["kind"]
    if kind == "data":
        return job_data(out, job.get("threshold", 0.5))
    if kind == "distill":
        return job_distill(out, job["name"], job["seed"], job["settings"], job.get("threshold", 0.5))
    return job_evaluate(out, job["split"], job.get("lora"), job.get("threshold", 0.5))


# ---------------------------------------------------------------- the phases

def evaluate(split: str, name: str | None, seed: int | None = None, threshold: float = 0.5) -> dict:
    lora = f"{name}-s{seed}" if name else None
    tag = f"eval-{split}-{lora or 'base'}" + (f"-t{threshold}" if threshold != 0.5 else "")
    return {"job": tag, "kind": "evaluate", "split": split, "lora": lora, "threshold": threshold,
            "after": [f"distill-{lora}"] if lora else []}


def distill(name: str, seed: int, settings: dict, threshold: float = 0.5) -> dict:
    job = {"job": f"distill-{name}-s{seed}", "kind": "distill", "name": name, "seed": seed, "settings": settings}
    if threshold != 0.5:
        job.update(threshold=threshold, after=[f"data-t{threshold}"])
    return job


def data(threshold: float = 0.5) -> dict:
    if threshold == 0.5:
        return {"job": "data", "kind": "data"}
    return {"job": f"data-t{threshold}", "kind": "data", "threshold": threshold}


def choose_jobs() -> list[dict]:
    jobs = [evaluate("val", None, threshold=t) for t in THRESHOLDS]
    jobs += [data(t) for t in sorted(set(THRESHOLD.values()))]
    for name, settings in CANDIDATES.items():
        t = THRESHOLD.get(name, 0.5)
        jobs += [distill(name, 0, settings, t), evaluate("val", name, 0, t)]
    return jobs


def score(metrics: dict) -> float:
    """What the choice on val maximises: the mean of pixel-tag F1 and caption mIoU (the two figures of the paper's
    Table 1 and caption segmentation)."""
    return (metrics["pixel"]["f1"] + metrics["caption"]["caption_miou"]) / 2


def chosen(out: Path) -> tuple[str, float]:
    """The candidate with the best validation score, and the validation's best base threshold."""
    done = results(out)
    best = max(CANDIDATES, key=lambda n: score(done[evaluate("val", n, 0, THRESHOLD.get(n, 0.5))["job"]]["metrics"]))
    threshold = max(THRESHOLDS, key=lambda t: done[evaluate("val", None, threshold=t)["job"]]["metrics"]["pixel"]["f1"])
    return best, threshold


def report_jobs(out: Path) -> list[dict]:
    best, _ = chosen(out)
    t = THRESHOLD.get(best, 0.5)
    control = "control" if t == 0.5 else f"control-t{t}"
    jobs = [evaluate("eval", None, threshold=t)]
    for seed in SEEDS:
        jobs += [distill(best, seed, CANDIDATES[best], t), evaluate("eval", best, seed, t),
                 distill(control, seed, CONTROL, t), evaluate("eval", control, seed, t)]
    return jobs


# ---------------------------------------------------------------- the tables

def table(out: Path) -> str:
    done = results(out)
    head = table_head()
    lines = ["Validation split (choices):", "", head]
    for t in THRESHOLDS:
        row = done.get(evaluate("val", None, threshold=t)["job"])
        if row:
            lines.append(f"| base, threshold {t} | " + " | ".join(cells([row])) + " |")
    for name in CANDIDATES:
        row = done.get(evaluate("val", name, 0, THRESHOLD.get(name, 0.5))["job"])
        if row:
            lines.append(f"| {name} (seed 0) | " + " | ".join(cells([row])) + f" | score {score(row['metrics']):.2f}")
    lines += ["", "Eval split (reported; mean ± sample std over seeds 0-2):", "", head]
    for t in sorted({0.5, *THRESHOLD.values()}):
        base = done.get(evaluate("eval", None, threshold=t)["job"])
        if base:
            lines.append(f"| base model, threshold {t} | " + " | ".join(cells([base])) + " |")
        for name in ("control" if t == 0.5 else f"control-t{t}",
                     *(n for n in CANDIDATES if THRESHOLD.get(n, 0.5) == t)):
            lines += seed_rows(done, name, [evaluate("eval", name, s, t)["job"] for s in SEEDS])
    return "\n".join(lines)


def main() -> None:
    args = parse_phases(__doc__, work)
    if args is None:
        return
    if args.phase == "table":
        print(table(args.out))
        return
    if args.phase in ("data", "all"):
        run_all(__file__, args.out, [{"job": "data", "kind": "data"}], 1)
    if args.phase in ("choose", "all"):
        run_all(__file__, args.out, choose_jobs(), args.parallel)
        best, threshold = chosen(args.out)
        print(f"chosen on val: {best}; best base threshold {threshold}", flush=True)
    if args.phase in ("report", "all"):
        run_all(__file__, args.out, report_jobs(args.out), args.parallel)
    print(table(args.out))


if __name__ == "__main__":
    main()
