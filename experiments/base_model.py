"""Issue 16's base model: the pre-training recipe behind the embedded model, and what each stage of it gives.

Phases (each resumable: the pre-training continues from its checkpoint, an evaluation already in
OUT/results.jsonl is skipped):

  data      `ttd synth` train 2000 / val 500 / eval 500 / pretrain 100000 (seed 0, the default CC3M-like world).
  pretrain  `ttd pretrain --preset embedded` on the pretrain split (2,000 steps of 128, about 2.6 epochs), keeping a
            snapshot of the weights every SNAPSHOT_EVERY steps (OUT/snapshots/), so the epochs lever is measured
            on one run.
  evaluate  every snapshot on val with the product's default evaluation (the epochs lever); the final model on val
            at the selection thresholds THRESHOLDS (the default threshold is chosen there), then on eval.
  levers    resolution and patch size at the quick scale (300 steps of 64 on the first 20,000 pretrain pairs, the
            session-4 lever protocol): ttd-tiny (96 px, patch 8: a 12x12 map) against patch 12 and 16 at 96 px and
            patch 8 at 64 px, each evaluated on val at the default threshold.
  anneal    (a probe) a snapshot trained on for --steps at a peak lr of --lr decaying to zero (20,000 pairs, batch
            128), then evaluated on val: does the learning rate, not the data, spoil the patch features?
  heads     (a probe) a snapshot evaluated on val with the other training-free heads (sclip, clearclip, naclip).
  table     the Markdown rows for docs/BENCHMARKS.md, from results.jsonl.
  ship      (not part of `all`) copy OUT/base into the package as the embedded model
            (ttd/models/embedded/ttd-tiny-tagmask), its model.json naming the corpus and the command that rebuilds it.

    .venv/bin/python experiments/base_model.py all --out /work/exp16        # about 1 h 30 min on 2 idle cores
    .venv/bin/python experiments/base_model.py table --out /work/exp16
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from jobs import record, results  # experiments/jobs.py, beside this script

SNAPSHOT_EVERY = 400
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
SYNTH = {"train": 2000, "val": 500, "eval": 500, "pretrain": 100_000, "seed": 0}


def data(out: Path) -> None:
    from ttd.synth.generate import synthesize

    if not (out / "synth" / "synth.json").exists():
        synthesize(str(out / "synth"), **SYNTH)


def pretrain(out: Path, steps: int | None = None) -> dict:
    """The embedded preset on the pretrain split; a snapshot of the weights every SNAPSHOT_EVERY steps."""
    from ttd.configs import preset
    from ttd.train.pretrain import run_pretrain

    base, snaps = out / "base", out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    state = base / "checkpoint" / "state.json"
    seen = {"mtime": None}

    def keep_snapshot(kind: str, n: int, loss: float) -> None:
        # run_pretrain writes a checkpoint every checkpoint_every steps before reporting the step: copy the
        # checkpoint's tensors when its step is a snapshot step
        if kind != "train" or not state.exists() or state.stat().st_mtime == seen["mtime"]:
            return
        seen["mtime"] = state.stat().st_mtime
        doc = json.loads(state.read_text())
        if doc["step"] % SNAPSHOT_EVERY == 0 and not (snaps / f"step-{doc['step']:05d}.safetensors").exists():
            shutil.copy(base / "checkpoint" / doc["tensors"], snaps / f"step-{doc['step']:05d}.safetensors")

    if (base / "model.json").exists():
        return json.loads((base / "model.json").read_text())
    config = preset("embedded", **({"steps": steps} if steps else {}))
    summary = run_pretrain(str(out / "synth" / "pretrain"), str(base), config, seed=0, progress=keep_snapshot)
    print(json.dumps(summary), flush=True)
    return summary


def snapshot_model(out: Path, snapshot: Path) -> Path:
    """A snapshot's weights as a model artefact (fp16, like the shipped model)."""
    import torch

    from ttd.models.artefact import load_state_dict
    from ttd.models.loading import load_model
    from ttd.train.pretrain import save_artefact

    dest = out / "snapshot-models" / snapshot.stem
    if (dest / "model.json").exists():
        return dest
    bundle = load_model("ttd-tiny", device=torch.device("cpu"), seed=0)
    state = load_state_dict(snapshot)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            p.copy_(state[f"param.{name}"])
    save_artefact(dest, bundle, {"kind": "pretrain-snapshot", "snapshot": snapshot.name}, fp16=True)
    return dest


def evaluate(out: Path, model_dir: Path, split: str, label: str, thresholds=THRESHOLDS) -> None:
    from ttd.configs import ScoreConfig, TagmaskEvalConfig
    from ttd.eval.tagmask import run_tagmask_eval

    for t in thresholds if split == "val" else (None,):
        job = f"{label}-{split}-t{t}"
        if job in results(out):
            continue
        config = TagmaskEvalConfig(score=ScoreConfig(threshold=t)) if t is not None else TagmaskEvalConfig()
        t0 = time.time()
        summary = run_tagmask_eval(str(out / "synth" / split), str(out / "evalstore"), config,
                                   pretrained=str(model_dir))
        record(out, {"job": job, "model": label, "split": split, "threshold": t, "metrics": summary["metrics"],
                     "wall_s": round(time.time() - t0, 1)})
        print(job, json.dumps({m: summary["metrics"].get(m) for m in ("pixel", "noun")}), flush=True)


# README's query: how often pixel-tag scoring selected a spaCy stop word (and every other candidate)
STOP_WORDS_SQL = ("SELECT t.is_stop, avg(r.selected::INT) AS selection_rate, count(*) AS n FROM relevancy r "
                  "JOIN tags t USING (corpus, shard, key, tag_index) GROUP BY 1 ORDER BY 1")


def stop_words(out: Path, split: str) -> None:
    """`ttd parse` and `ttd score` (product defaults) of a labelled split, then README's stop-word query."""
    from ttd.configs import ParseConfig, ScoreConfig
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score
    from ttd.store.sql import query

    job = f"stopwords-{split}"
    if job in results(out):
        return
    root, store = str(out / "synth" / split), str(out / f"store-{split}")
    run_parse(root, store, ParseConfig())
    run_score(root, store, ScoreConfig(), pretrained=str(out / "base"), workers=0)
    rows = {r["is_stop"]: r for r in query(store, STOP_WORDS_SQL).to_pylist()}
    record(out, {"job": job, "split": split, "stop_word_rate": 100 * rows[True]["selection_rate"],
                 "stop_word_candidates": rows[True]["n"], "other_rate": 100 * rows[False]["selection_rate"],
                 "other_candidates": rows[False]["n"]})


def evaluate_all(out: Path) -> None:
    for snap in sorted((out / "snapshots").glob("step-*.safetensors")):
        evaluate(out, snapshot_model(out, snap), "val", snap.stem, thresholds=(0.4,))  # the epochs lever
    if (out / "base" / "model.json").exists():
        evaluate(out, out / "base", "val", "final")
        evaluate(out, out / "base", "eval", "final")
        for split in ("val", "eval"):
            stop_words(out, split)


# name -> changes to ttd-tiny's vision tower (its text tower and widths are kept)
LEVERS = {"tiny-96-p8": {}, "tiny-96-p12": {"patch_size": 12}, "tiny-96-p16": {"patch_size": 16},
          "tiny-64-p8": {"image_size": 64}}


def levers(out: Path) -> None:
    import open_clip

    from ttd.configs import preset
    from ttd.models.loading import CONFIG_DIR
    from ttd.train.pretrain import run_pretrain

    base_cfg = json.loads((CONFIG_DIR / "ttd-tiny.json").read_text())
    for name, vision in LEVERS.items():
        path = out / "lever-configs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**base_cfg, "vision_cfg": {**base_cfg["vision_cfg"], **vision}}))
        open_clip.add_model_config(path)
        dest = out / "levers" / name
        if not (dest / "model.json").exists():
            run_pretrain(str(out / "synth" / "pretrain"), str(dest), preset("quick", model=name, max_samples=20_000),
                         seed=0)
        evaluate(out, dest, "val", f"lever-{name}", thresholds=(0.4,))


def anneal(out: Path, snapshot: str, steps: int, lr: float) -> None:
    from ttd.configs import PretrainConfig
    from ttd.train.pretrain import run_pretrain

    start = snapshot_model(out, out / "snapshots" / f"{snapshot}.safetensors")
    dest = out / "anneal" / f"{snapshot}-{steps}-{lr}"
    if not (dest / "model.json").exists():
        run_pretrain(str(out / "synth" / "pretrain"), str(dest),
                     PretrainConfig(pretrained=str(start), steps=steps, lr=lr, warmup_steps=0, batch_size=128,
                                    max_samples=20_000), seed=0)
    evaluate(out, dest, "val", f"anneal-{snapshot}-{steps}-{lr}", thresholds=(0.4,))


def heads(out: Path, snapshot: str) -> None:
    from ttd.configs import ScoreConfig, TagmaskEvalConfig
    from ttd.eval.tagmask import run_tagmask_eval

    model = snapshot_model(out, out / "snapshots" / f"{snapshot}.safetensors")
    for head in ("sclip", "clearclip", "naclip"):
        job = f"{snapshot}-val-{head}"
        if job not in results(out):
            summary = run_tagmask_eval(str(out / "synth" / "val"), str(out / "evalstore"),
                                       TagmaskEvalConfig(score=ScoreConfig(head=head)), pretrained=str(model))
            record(out, {"job": job, "model": f"{snapshot} ({head})", "split": "val", "threshold": 0.4,
                         "metrics": summary["metrics"]})


def stop_word_lines(out: Path) -> list[str]:
    return [f"{r['split']}: stop words selected {r['stop_word_rate']:.1f}% of {r['stop_word_candidates']}, other "
            f"candidates {r['other_rate']:.1f}% of {r['other_candidates']}"
            for r in results(out).values() if r["job"].startswith("stopwords-")]


def table(out: Path) -> None:
    print("\n".join(stop_word_lines(out)))
    # OUT/results.jsonl is shared with ttd_gain.py: only this script's evaluations (they name a model)
    rows = sorted((r for r in results(out).values() if "metrics" in r and "model" in r), key=lambda r: r["job"])
    print("| model | split | threshold | image F1 | text F1 | pixel P | pixel R | pixel F1 | noun F1 | caption mIoU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        cells = [m.get("image", {}).get("f1"), m.get("text", {}).get("f1"), m["pixel"]["precision"],
                 m["pixel"]["recall"], m["pixel"]["f1"], m.get("noun", {}).get("f1"),
                 m.get("caption", {}).get("caption_miou")]
        print(f"| {r['model']} | {r['split']} | {r['threshold'] or 'default'} | "
              + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")


EMBEDDED = Path(__file__).resolve().parent.parent / "ttd" / "models" / "embedded" / "ttd-tiny-tagmask"
REPRODUCE = ("ttd synth OUT --train {train} --val {val} --eval {eval} --pretrain {pretrain} --seed {seed} && "
             "OMP_NUM_THREADS=2 ttd pretrain --corpus OUT/pretrain --out BASE --preset embedded --seed 0")


def ship(out: Path) -> None:
    doc = json.loads((out / "base" / "model.json").read_text())
    doc["corpus"] = "TagMask-Synth pretrain split ({pretrain} pairs, seed {seed}, the default caption style)".format(
        **SYNTH)
    doc["reproduce"] = REPRODUCE.format(**SYNTH)
    shutil.copy(out / "base" / "model.safetensors", EMBEDDED / "model.safetensors")
    (EMBEDDED / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"shipped {out / 'base'} -> {EMBEDDED} ({(EMBEDDED / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["all", "data", "pretrain", "evaluate", "levers", "anneal", "heads", "table",
                                      "ship"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--pretrain-steps", type=int, help="pretrain: steps instead of the embedded preset's (session 8's "
                    "second run: 4000)")
    ap.add_argument("--snapshot", help="anneal, heads: the snapshot, e.g. step-01200")
    ap.add_argument("--steps", type=int, default=150, help="anneal: steps")
    ap.add_argument("--lr", type=float, default=3e-4, help="anneal: peak learning rate")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "data"):
        data(args.out)
    if args.phase in ("all", "pretrain"):
        pretrain(args.out, args.pretrain_steps)
    if args.phase in ("all", "evaluate"):
        evaluate_all(args.out)
    if args.phase in ("all", "levers"):
        levers(args.out)
    if args.phase == "anneal":
        anneal(args.out, args.snapshot, args.steps, args.lr)
    if args.phase == "heads":
        heads(args.out, args.snapshot)
    if args.phase in ("all", "table"):
        table(args.out)
    if args.phase == "ship":
        ship(args.out)


if __name__ == "__main__":
    main()
