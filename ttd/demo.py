"""`ttd demo`: the whole pipeline on TagMask-Synth with the embedded base model, offline, on a laptop CPU.

The demo is one RunConfig (the same file format as `ttd run --config`; configs/demo.yaml is its YAML twin): synthesise
a small TagMask-Synth corpus and eval set, parse, score with one local Ray actor, distill (LoRA) and evaluate the
base model and the fine-tuned one; then the report. Nothing is pre-trained: the embedded base model is shipped in
the package. This module builds the config and the base-vs-TTD table; the CLI runs the flow.
"""

from __future__ import annotations

from typing import Any

from .runconfig import RunConfig

# What the demo trains on and for how long: sized to finish in a few minutes on 2 CPU cores.
DEMO_TRAIN = 800
DEMO_EVAL = 200
DEMO_DISTILL_STEPS = 100


def demo_config(out: str) -> RunConfig:
    out = out.rstrip("/")
    return RunConfig.model_validate({
        "name": "demo",
        "store": f"{out}/store",
        "synth": {"out": f"{out}/synth", "train": DEMO_TRAIN, "eval": DEMO_EVAL, "pretrain": 0, "seed": 0,
                  "config": {"shard_size": 200}},
        "parse": {"policy": "words"},
        "score": {"head": "maskclip", "selection": "pixel", "threshold": 0.4},
        "ray": {"workers": 1},
        "evaluate": {},
        "distill": {"enabled": True, "out": f"{out}/ttd-lora", "seed": 0, "config": {"steps": DEMO_DISTILL_STEPS}},
        "flow": {"shards_per_batch": 2, "retries": 2, "retry_delay_seconds": 5},
    })


ROWS = (
    ("pixel-tag F1", "pixel", "f1"), ("pixel-tag precision", "pixel", "precision"),
    ("pixel-tag recall", "pixel", "recall"), ("pixel-tag mAP", "pixel", "map"),
    ("image-tag F1", "image", "f1"), ("text-tag F1", "text", "f1"), ("noun baseline F1", "noun", "f1"),
    ("<= 1 true tag selected (%)", "pixel", "single_tag_share"),
    ("caption mIoU", "caption", "caption_miou"), ("caption mFPR", "caption", "caption_mfpr"),
    ("caption mFNR", "caption", "caption_mfnr"), ("coverage of best tag", "caption", "coverage_best"),
    ("coverage of second tag", "caption", "coverage_second"),
)


def comparison_rows(base: dict[str, dict[str, float]], tuned: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for label, method, metric in ROWS:
        a, b = base.get(method, {}).get(metric), tuned.get(method, {}).get(metric)
        rows.append({"metric": label, "base": a, "ttd": b,
                     "delta": None if a is None or b is None else round(b - a, 3)})
    return rows


def comparison_text(base: dict[str, dict[str, float]], tuned: dict[str, dict[str, float]]) -> str:
    lines = [f"{'TagMask-Synth eval':30s} {'base':>7s} {'TTD':>7s} {'delta':>7s}"]
    for r in comparison_rows(base, tuned):
        cells = [f"{v:7.1f}" if v is not None else f"{'-':>7s}" for v in (r["base"], r["ttd"])]
        delta = f"{r['delta']:+7.1f}" if r["delta"] is not None else f"{'-':>7s}"
        lines.append(f"{r['metric']:30s} {cells[0]} {cells[1]} {delta}")
    return "\n".join(lines)
