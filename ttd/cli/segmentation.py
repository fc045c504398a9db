"""Body of `ttd evaluate --dataset voc|context|coco-object|coco-stuff|cityscapes|ade`: ttd/cli/main.py calls it.

Progress and the result table go to stderr (rich); with `as_json` one JSON document goes to stdout instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ttd.cli.output import emit_json, err, progress
from ttd.configs import SegEvalConfig, load_yaml
from ttd.errors import TTDError
from ttd.eval.segmentation.datasets import DATASETS, open_dataset
from ttd.eval.segmentation.run import run_segeval

SHOWN = (("miou", "mIoU"), ("mfpr", "mFPR"), ("mfnr", "mFNR"))


def evaluate_segmentation_command(dataset: str, root: str, store: str, model: str | None = None,
                                  pretrained: str | None = None, head: str | None = None,
                                  config_path: str | Path | None = None, max_images: int | None = None,
                                  device: str | None = None, as_json: bool = False,
                                  lora: str | None = None) -> dict[str, Any]:
    """Run the evaluation and report it; returns the summary (also printed as JSON on stdout with `as_json`)."""
    if dataset not in DATASETS:
        raise TTDError(f"--dataset must be one of {', '.join(DATASETS)} for segmentation, not {dataset!r}")
    overrides = {k: v for k, v in {"head": head, "max_images": max_images}.items() if v is not None}
    config = load_yaml(SegEvalConfig, config_path, overrides)
    open_dataset(dataset, root, config.max_images)  # a wrong layout is reported before any progress bar appears
    with progress(not as_json) as bar:
        task = bar.add_task(f"evaluate {dataset}", total=None, rate="")

        def step(state: dict) -> None:
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, completed=state["done"], total=state["total"],
                       rate=f"{state['done'] / elapsed:,.2f} images/s")

        summary = run_segeval(dataset, root, store, config, model=model, pretrained=pretrained, lora=lora,
                              device=device, progress=step)
    if as_json:
        emit_json(summary)
    else:
        err.print(_table(summary))
    return summary


def _table(summary: dict[str, Any]) -> Table:
    stored = ", stored result of an identical run" if summary["skipped"] else ""
    table = Table("dataset", "images", *(label for _, label in SHOWN),
                  caption=f"{summary['model_id']}, head {summary['head']}, run {summary['run']}{stored}")
    values = ("-" if summary["metrics"].get(m) is None else f"{summary['metrics'][m]:.2f}" for m, _ in SHOWN)
    table.add_row(summary["dataset"], str(summary["images"]), *values)
    return table
