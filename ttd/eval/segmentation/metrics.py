"""Segmentation metrics: per (image, class) pixel counts, a numpy reference, and the same metrics as DuckDB SQL.

Counts per image and class (ignore pixels excluded): intersection I (true positives), predicted P, target T and
union U = P + T - I. Summed over the dataset per class, with rates in percent:

- IoU = I / U, FPR = (P - I) / U, FNR = (T - I) / U, so IoU + FPR + FNR = 1 for every class;
- mIoU, mFPR, mFNR: their means over the classes with U > 0, i.e. the classes present in the ground truth or in
  the predictions anywhere in the eval set (mmseg's convention: a class never seen nor predicted is not a zero);
- aAcc = sum I / sum T (pixel accuracy), mAcc = mean of I / T over the classes with T > 0.

The SQL (`METRICS_SQL`) is what a run writes to `metrics`; `reference_metrics` is the numpy twin tests hold it to.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from ttd.eval.segmentation.datasets import IGNORE

COUNT_FIELDS = ("intersection", "union", "predicted", "target")
SUMMARY_METRICS = ("miou", "mfpr", "mfnr", "aacc", "macc")


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] pixel counts, rows = target class, columns = predicted class; ignore pixels left out."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
    valid = (label != IGNORE) & (label < num_classes)
    t = label[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted class ids must lie in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def counts_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    inter = np.diag(conf).astype(np.int64)
    predicted = conf.sum(axis=0).astype(np.int64)
    target = conf.sum(axis=1).astype(np.int64)
    return {"intersection": inter, "union": predicted + target - inter, "predicted": predicted, "target": target}


def image_counts(pred: np.ndarray, label: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Counts of one image for the classes it involves (union > 0): a missing row means all zeros."""
    counts = counts_from_confusion(confusion(pred, label, num_classes))
    keep = np.flatnonzero(counts["union"] > 0)
    return {"class_id": keep.astype(np.int32), **{k: v[keep] for k, v in counts.items()}}


def per_class(intersection, union, predicted, target) -> dict[str, np.ndarray]:
    """Per-class rates in [0, 1]; NaN where union (or target, for acc) is zero."""
    i, u, p, t = (np.asarray(a, dtype=np.float64) for a in (intersection, union, predicted, target))
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_u = np.where(u > 0, u, np.nan)
        return {"iou": i / safe_u, "fpr": (p - i) / safe_u, "fnr": (t - i) / safe_u,
                "acc": i / np.where(t > 0, t, np.nan)}


def reference_metrics(intersection, union, predicted, target) -> dict[str, float]:
    """mIoU, mFPR, mFNR, aAcc, mAcc in percent from per-class dataset totals (numpy reference of METRICS_SQL)."""
    rates = per_class(intersection, union, predicted, target)
    seen = ~np.isnan(rates["iou"])
    has_t = ~np.isnan(rates["acc"])
    total_t = float(np.sum(target))
    return {
        "miou": 100 * float(np.mean(rates["iou"][seen])) if seen.any() else float("nan"),
        "mfpr": 100 * float(np.mean(rates["fpr"][seen])) if seen.any() else float("nan"),
        "mfnr": 100 * float(np.mean(rates["fnr"][seen])) if seen.any() else float("nan"),
        "aacc": 100 * float(np.sum(intersection)) / total_t if total_t > 0 else float("nan"),
        "macc": 100 * float(np.mean(rates["acc"][has_t])) if has_t.any() else float("nan"),
    }


def totals(counts: pa.Table, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class dataset totals [C] from an `eval_counts`-shaped table."""
    ids = counts["class_id"].to_numpy()
    return {f: np.bincount(ids, weights=counts[f].to_numpy(), minlength=num_classes).astype(np.int64)
            for f in COUNT_FIELDS}


# One statement over the `eval_counts` view (as in `ttd sql`), for one run: `$run` is bound as a parameter; in
# `ttd sql` write the run id in its place.
METRICS_SQL = """
WITH per_class AS (
    SELECT class_id,
           sum(intersection)::DOUBLE AS i, sum("union")::DOUBLE AS u,
           sum(predicted)::DOUBLE AS p, sum(target)::DOUBLE AS t
    FROM eval_counts
    WHERE run = $run
    GROUP BY class_id
    HAVING sum("union") > 0
), summary AS (
    SELECT 100 * avg(i / u) AS miou,
           100 * avg((p - i) / u) AS mfpr,
           100 * avg((t - i) / u) AS mfnr,
           100 * sum(i) / nullif(sum(t), 0) AS aacc,
           100 * avg(i / t) FILTER (WHERE t > 0) AS macc
    FROM per_class
)
SELECT metric, value FROM summary UNPIVOT (value FOR metric IN (miou, mfpr, mfnr, aacc, macc))
"""

# Per-class rates of one run (not stored in `metrics`: one query away in `ttd sql`).
PER_CLASS_SQL = """
SELECT class_id, any_value(class_name) AS class_name,
       100 * sum(intersection) / sum("union") AS iou,
       100 * (sum(predicted) - sum(intersection)) / sum("union") AS fpr,
       100 * (sum(target) - sum(intersection)) / sum("union") AS fnr
FROM eval_counts
WHERE run = $run
GROUP BY class_id
HAVING sum("union") > 0
ORDER BY class_id
"""


def sql_metrics(con: duckdb.DuckDBPyConnection, run: str) -> dict[str, float]:
    """Run METRICS_SQL on a connection that has an `eval_counts` view or table with a `run` column."""
    rows = con.execute(METRICS_SQL, {"run": run}).fetchall()
    out = {m: float("nan") for m in SUMMARY_METRICS}
    out.update({metric: float(value) for metric, value in rows})
    return out


def sql_metrics_of(counts: pa.Table, run: str) -> dict[str, float]:
    """METRICS_SQL over an in-memory Arrow table of counts (one private connection, nothing written)."""
    if "run" not in counts.column_names:
        counts = counts.append_column("run", pa.array([run] * counts.num_rows, pa.string()))
    con = duckdb.connect()
    try:
        con.register("eval_counts", counts)
        return sql_metrics(con, run)
    finally:
        con.close()
