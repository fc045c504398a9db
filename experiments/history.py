"""The experiments behind docs/BENCHMARKS.md's sessions 3-5 tables (base-model levers, TTD variants, the 50-class
world), re-runnable from a fresh clone.

Those tables were measured with the code of their session; this script runs the same procedure with the settings
of that time pinned where a knob still exists for them (multi-object captions, the shipped compound list, the
maskclip head, min-max baselines, threshold 0.5). What has changed since and cannot be pinned: the noun baseline's
rule for compound nouns in `ttd evaluate` (two adjacent nouns now; the list then), and the synthetic renderer's
small fixes. Expect the figures within about a point, not to the digit.

    # a world: synth (train 2000 / eval 500 / pretrain 20000, seed 0), the quick base model, its pseudo-labels
    python experiments/history.py world OUT [--classes 50]
    # a base-model lever: `ttd pretrain --preset quick` plus the flags given, evaluated on OUT's eval split
    python experiments/history.py lever OUT NAME [--steps 600 --batch-size 32 ...]
    # a TTD variant: `ttd distill` on OUT's pseudo-labels plus the flags given, then evaluated
    python experiments/history.py variant OUT NAME SEED [--eval-head sclip] [--steps 200 --config cfg.yaml ...]
    # the base model (or any run) evaluated with another head
    python experiments/history.py evaluate OUT NAME [--lora OUT/runs/RUN] [--eval-head sclip]
    python experiments/history.py table OUT              # rows of OUT/results.jsonl

Every row goes to OUT/results.jsonl (a job already there is skipped, so a killed sweep resumes). Each step is the
`ttd` command line, so what it runs is what a user would type.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobs import subcommands  # experiments/jobs.py, beside this script

TTD = str(Path(sys.executable).parent / "ttd")
# the session 3-5 world: multi-object captions for train and eval, the alt-text pre-training split
WORLD = {"train_style": "multi_object", "eval_style": "multi_object"}
# the evaluation of that time: min-max baselines, threshold 0.5 (maskclip head, words policy: still the defaults)
EVALUATION = {"score": {"threshold": 0.5, "baseline_normalisation": "minmax"}}
PARSE = {"policy": "words", "compounds": True, "noun_pairs": False}
SCORE = {"threshold": 0.5}


def ttd(*args: str) -> str:
    print("+ ttd", " ".join(args), flush=True)
    return subprocess.run([TTD, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def write_yaml(path: Path, doc: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def done(out: Path) -> set[str]:
    path = out / "results.jsonl"
    return {json.loads(line)["job"] for line in path.read_text().splitlines() if line.strip()} if path.exists() \
        else set()


def evaluate(out: Path, job: str, pretrained: Path, lora: Path | None = None, head: str | None = None) -> None:
    if job in done(out):
        return
    cfg = write_yaml(out / "configs" / "evaluate.yaml", EVALUATION)
    args = ["evaluate", "--dataset", "tagmask", "--root", str(out / "synth" / "eval"), "--store",
            str(out / "evalstore"), "--pretrained", str(pretrained), "--config", str(cfg), "--json"]
    args += ["--lora", str(lora)] if lora else []
    args += ["--head", head] if head else []
    metrics = json.loads(ttd(*args))
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"job": job, "head": head or "maskclip", **metrics}) + "\n")


def world(out: Path, classes: int | None) -> None:
    synth = out / "synth"
    if not (synth / "synth.json").exists():
        cfg = write_yaml(out / "configs" / "synth.yaml", WORLD)
        ttd("synth", str(synth), "--train", "2000", "--eval", "500", "--pretrain", "20000", "--seed", "0",
            "--config", str(cfg), *(["--classes", str(classes)] if classes else []))
    if not (out / "base" / "model.json").exists():
        ttd("pretrain", "--corpus", str(synth / "pretrain"), "--out", str(out / "base"), "--preset", "quick")
    parse = write_yaml(out / "configs" / "parse.yaml", PARSE)
    score = write_yaml(out / "configs" / "score.yaml", SCORE)
    ttd("parse", "--corpus", str(synth / "train"), "--store", str(out / "store"), "--config", str(parse))
    ttd("score", "--corpus", str(synth / "train"), "--store", str(out / "store"), "--pretrained",
        str(out / "base"), "--config", str(score), "--workers", "0")
    evaluate(out, "base", out / "base")


def lever(out: Path, name: str, flags: list[str]) -> None:
    dest = out / "levers" / name
    if not (dest / "model.json").exists():
        ttd("pretrain", "--corpus", str(out / "synth" / "pretrain"), "--out", str(dest), "--preset", "quick", *flags)
    evaluate(out, f"lever-{name}", dest)


def variant(out: Path, name: str, seed: int, head: str | None, flags: list[str]) -> None:
    run = out / "runs" / f"{name}-s{seed}"
    if not (run / "lora.json").exists():
        ttd("distill", "--corpus", str(out / "synth" / "train"), "--store", str(out / "store"), "--out", str(run),
            "--pretrained", str(out / "base"), "--seed", str(seed), *flags)
    evaluate(out, f"{name}-s{seed}" + (f"-{head}" if head else ""), out / "base", lora=run, head=head)


def table(out: Path) -> None:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    print("| job | head | pixel P | pixel R | pixel F1 | image F1 | text F1 | noun F1 | caption mIoU | cover 2nd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("metrics", r)
        cells = [m["pixel"]["precision"], m["pixel"]["recall"], m["pixel"]["f1"], m["image"]["f1"],
                 m["text"]["f1"], m["noun"]["f1"], m["caption"]["caption_miou"], m["caption"]["coverage_second"]]
        print(f"| {r['job']} | {r['head']} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def main() -> None:
    out = ("out", {"type": Path})
    ap = subcommands(__doc__, {
        "world": [out, ("--classes", {"type": int})],
        "lever": [out, ("name",)],
        "variant": [out, ("name",), ("seed", {"type": int}), ("--eval-head",)],
        "evaluate": [out, ("name",), ("--lora", {"type": Path}), ("--eval-head",)],
        "table": [out],
    })
    args, flags = ap.parse_known_args()
    if args.cmd not in ("lever", "variant") and flags:
        ap.error(f"unrecognised arguments: {' '.join(flags)}")
    if args.cmd == "world":
        world(args.out, args.classes)
    elif args.cmd == "lever":
        lever(args.out, args.name, flags)
    elif args.cmd == "variant":
        variant(args.out, args.name, args.seed, args.eval_head, flags)
    elif args.cmd == "evaluate":
        evaluate(args.out, args.name + (f"-{args.eval_head}" if args.eval_head else ""), args.out / "base",
                 args.lora, args.eval_head)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
