"""Stage `evaluate` on a segmentation eval set: per-image class counts -> `eval_counts`, SQL metrics -> `metrics`.

One run is one partition `run=RUN_ID` of both tables, RUN_ID = fingerprint of (model id, dataset, root, protocol,
class names).
The manifest's fingerprint adds the eval set's file listing and the stage version: a re-run with the same
fingerprint is skipped (its stored metrics are returned); a changed eval set or code redoes the run in place.
Unreadable samples become `errors` rows (corpus = dataset, shard = run id); the others are still evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

from ttd.configs import SegEvalConfig
from ttd.eval.segmentation.datasets import SampleError, SegDataset, open_dataset
from ttd.eval.segmentation.infer import Segmenter, resolve_config, result_config
from ttd.eval.segmentation.metrics import SUMMARY_METRICS, image_counts, sql_metrics_of
from ttd.models import load_model
from ttd.store import schemas
from ttd.store.store import Store, fingerprint

log = logging.getLogger(__name__)

STAGE = "evaluate"
STAGE_VERSION = 1


def run_id_for(model_id: str, dataset: str, root: str | Path, config: SegEvalConfig,
               class_names: tuple[str, ...] = ()) -> str:
    """The class names are part of the protocol: editing a class file is a new run."""
    return fingerprint("segeval", model_id, dataset, str(Path(root).resolve()), result_config(config),
                       list(class_names))


def _counts_table(rows: list[dict[str, np.ndarray]], keys: list[str], dataset: str,
                  names: tuple[str, ...]) -> pa.Table:
    def column(name: str, dtype) -> np.ndarray:
        return np.concatenate([r[name] for r in rows]).astype(dtype) if rows else np.zeros(0, dtype)

    sizes = [len(r["class_id"]) for r in rows]
    class_id = column("class_id", np.int32)
    return pa.table({
        "dataset": pa.array([dataset] * len(class_id), pa.string()),
        "key": pa.array([k for k, n in zip(keys, sizes) for _ in range(n)], pa.string()),
        "class_id": pa.array(class_id, pa.int32()),
        "class_name": pa.array([names[c] for c in class_id], pa.string()),
        **{f: pa.array(column(f, np.int64), pa.int64()) for f in ("intersection", "union", "predicted", "target")},
    })


def _metrics_table(values: dict[str, float], dataset: str, method: str, fp: str, model_id: str) -> pa.Table:
    names = [m for m in (*SUMMARY_METRICS, "images") if m in values and not np.isnan(values[m])]
    n = len(names)
    return pa.table({"dataset": [dataset] * n, "metric": names, "method": [method] * n,
                     "value": pa.array([float(values[m]) for m in names], pa.float64()),
                     "fingerprint": [fp] * n, "model_id": [model_id] * n})


def _errors_table(errors: list[SampleError]) -> pa.Table:
    rows = [{"key": e.key, "stage": STAGE, "error_type": e.error_type, "message": str(e), "severity": "error",
             "source": e.source or None} for e in errors]
    return pa.Table.from_pylist(rows, schema=schemas.get("errors").arrow)


def _stored_metrics(store: Store, run_id: str) -> dict[str, float]:
    table = store.read("metrics", columns=["metric", "value"], filter=ds.field("run") == run_id)
    return dict(zip(table["metric"].to_pylist(), table["value"].to_pylist()))


def _stored_errors(store: Store, dataset: str, run_id: str) -> int:
    where = (ds.field("corpus") == dataset) & (ds.field("shard") == run_id) & (ds.field("stage") == STAGE)
    return store.read("errors", columns=["key"], filter=where).num_rows


def run_segeval(dataset: str, root: str | Path, store_uri: str, config: SegEvalConfig | None = None, *,
                model: str | None = None, pretrained: str | None = None, lora: str | None = None,
                device: str | None = None, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Evaluate a model on a segmentation eval set and commit `eval_counts` + `metrics`; return the summary.

    `progress` is called after each image with {"done": n, "total": N}."""
    config = resolve_config(config or SegEvalConfig(), dataset)
    data = open_dataset(dataset, root, config.max_images)  # a wrong layout fails before the model loads
    store = Store(store_uri, create=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_model(model, pretrained, device=device, lora=lora)
    run_id = run_id_for(bundle.model_id, dataset, data.root, config, data.class_names)
    input_fp = data.fingerprint()
    fp = fingerprint(run_id, STAGE_VERSION, input_fp)
    summary: dict[str, Any] = {"dataset": dataset, "root": str(data.root), "run": run_id, "fingerprint": fp,
                               "model_id": bundle.model_id, "head": config.head, "classes": data.num_classes}
    partition = {"run": run_id}
    if store.is_done(STAGE, partition, fp):
        log.info("segmentation run %s on %s already done: skipped", run_id, dataset)
        metrics = _stored_metrics(store, run_id)
        if progress:
            progress({"done": len(data), "total": len(data)})
        return {**summary, "skipped": True, "images": int(metrics.get("images", 0)),
                "errors": _stored_errors(store, dataset, run_id),
                "metrics": {m: metrics.get(m) for m in SUMMARY_METRICS}}

    counts, keys, errors, started = _evaluate(data, bundle, config, progress)
    table = _counts_table(counts, keys, dataset, data.class_names)
    metrics = sql_metrics_of(table, run_id)
    metrics["images"] = float(len(keys))
    manifest_config = {**result_config(config), "dataset": dataset, "root": str(data.root)}
    store.commit(STAGE, {"corpus": dataset, "shard": run_id}, fp, {"errors": _errors_table(errors)},
                 stage_version=STAGE_VERSION, config=manifest_config, model_id=bundle.model_id)
    store.commit(STAGE, partition, fp,
                 {"eval_counts": table, "metrics": _metrics_table(metrics, dataset, config.head, fp, bundle.model_id)},
                 stage_version=STAGE_VERSION, config=manifest_config, model_id=bundle.model_id,
                 input_fingerprint=input_fp)
    elapsed = time.perf_counter() - started
    log.info("evaluated %d %s images in %.1f s: mIoU %.2f", len(keys), dataset, elapsed, metrics["miou"])
    return {**summary, "skipped": False, "images": len(keys), "errors": len(errors), "seconds": round(elapsed, 3),
            "images_per_s": round(len(keys) / elapsed, 3) if elapsed > 0 else None,
            "metrics": {m: (None if np.isnan(metrics[m]) else metrics[m]) for m in SUMMARY_METRICS}}


def _evaluate(data: SegDataset, bundle, config: SegEvalConfig, progress):
    """Stream the eval set through the segmenter; per-image counts stay small (classes involved only)."""
    segmenter = Segmenter(bundle, data.class_names, data.has_background, config)
    counts: list[dict[str, np.ndarray]] = []
    keys: list[str] = []
    errors: list[SampleError] = []

    def on_error(exc: SampleError) -> None:
        log.warning("%s: %s (%s)", exc.key, exc, exc.error_type)
        errors.append(exc)

    started = time.perf_counter()
    for sample, pred in segmenter.predict(data.samples(on_error)):
        counts.append(image_counts(pred, sample.label, data.num_classes))
        keys.append(sample.key)
        if progress:
            progress({"done": len(keys) + len(errors), "total": len(data)})
    return counts, keys, errors, started
