"""`ttd demo`: the whole pipeline on TagMask-Synth with the embedded base model, offline, on a laptop CPU.

The demo is one RunConfig, configs/demo.yaml (the file `ttd run --config` reads; shipped in the wheel): synthesise
a small TagMask-Synth corpus and eval set, parse, score with one local Ray actor, distill (LoRA) and evaluate the
base model and the fine-tuned one; then the report. Nothing is pre-trained: the embedded base model is shipped in
the package. This module builds the config and the base-vs-TTD table; the CLI runs the flow.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ttd.pipeline.runconfig import RunConfig

DEMO_OUT = "out/demo"  # the YAML's output folder; `ttd demo --out` moves every path under it


def demo_yaml() -> Path:
    """configs/demo.yaml: shipped inside the wheel as ttd/demo.yaml; in a checkout it sits in configs/."""
    packaged = resources.files("ttd") / "demo.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_config(out: str) -> RunConfig:
    """The settings of configs/demo.yaml (the one copy of them), with its paths under `out`."""
    out = out.rstrip("/")

    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, str) and (value == DEMO_OUT or value.startswith(DEMO_OUT + "/")):
            return out + value[len(DEMO_OUT):]
        return value

    return RunConfig.model_validate(moved(yaml.safe_load(demo_yaml().read_text())))


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
