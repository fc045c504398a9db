"""Every evaluation metric as one DuckDB query over `eval_predictions` and `eval_counts`.

The same SQL runs in `ttd evaluate` (over the run's in-memory tables, before they are committed) and in
`ttd sql` (over the store), so a user can recompute or slice any published number.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

CAPTION_CLASS_ID = -1  # eval_counts rows of the caption-level mask; other rows are per ground-truth tag class
# eval_counts rows of the union of the selected tags' heatmaps (L_distill's target) against the caption's true union
SELECTED_UNION_CLASS_ID = -2

# Word-level multi-tag classification, micro-averaged over all candidate words, per method (percent).
TAG_CLASSIFICATION = """
WITH c AS (
  SELECT method,
         sum((predicted AND target)::INT) AS tp, sum((predicted AND NOT target)::INT) AS fp,
         sum((NOT predicted AND target)::INT) AS fn, sum((NOT predicted AND NOT target)::INT) AS tn
  FROM eval_predictions GROUP BY method)
SELECT method,
       100.0 * tp / nullif(tp + fp, 0) AS precision,
       100.0 * tp / nullif(tp + fn, 0) AS recall,
       100.0 * 2 * tp / nullif(2 * tp + fp + fn, 0) AS f1,
       100.0 * (tp + tn) / nullif(tp + fp + fn + tn, 0) AS accuracy
FROM c ORDER BY method
"""

# Mean over captions (with at least one true tag) of the average precision of its words ranked by score.
TAG_MAP = """
WITH ranked AS (
  SELECT method, key, target,
         sum(target::INT) OVER w AS hits, row_number() OVER w AS rank
  FROM eval_predictions WHERE score IS NOT NULL
  WINDOW w AS (PARTITION BY method, key ORDER BY score DESC, word_index ROWS UNBOUNDED PRECEDING)),
ap AS (
  SELECT method, key, avg(CASE WHEN target THEN hits / rank END) AS ap
  FROM ranked GROUP BY method, key HAVING sum(target::INT) > 0)
SELECT method, 100.0 * avg(ap) AS map FROM ap GROUP BY method ORDER BY method
"""

# Single tag bias: among captions with 2+ true tags, the share where at most one true tag is selected.
SINGLE_TAG_SHARE = """
WITH per AS (
  SELECT method, key, sum(target::INT) AS n_true, sum((predicted AND target)::INT) AS n_hit
  FROM eval_predictions GROUP BY method, key)
SELECT method, 100.0 * avg((n_hit <= 1)::INT) AS single_tag_share, count(*) AS multi_tag_captions
FROM per WHERE n_true >= 2 GROUP BY method ORDER BY method
"""

# Caption-level segmentation, averaged over captions: IoU, FPR = (P - TP) / union, FNR = (T - TP) / union; of the
# caption heatmap's mask (CAPTION_CLASS_ID) or of the selected tags' union (SELECTED_UNION_CLASS_ID).
def caption_segmentation_sql(class_id: int) -> str:
    return f"""
SELECT 100.0 * avg(intersection / nullif("union", 0)) AS caption_miou,
       100.0 * avg((predicted - intersection) / nullif("union", 0)) AS caption_mfpr,
       100.0 * avg((target - intersection) / nullif("union", 0)) AS caption_mfnr,
       count(*) AS captions
FROM eval_counts WHERE class_id = {int(class_id)} AND target > 0
"""

# How much of each true tag's region the caption mask covers: best-covered vs second-best-covered tag.
TAG_COVERAGE = """
WITH cov AS (
  SELECT key, intersection / nullif(target, 0) AS coverage,
         row_number() OVER (PARTITION BY key ORDER BY intersection / nullif(target, 0) DESC, class_id) AS r,
         count(*) OVER (PARTITION BY key) AS n
  FROM eval_counts WHERE class_id >= 0 AND target > 0)
SELECT 100.0 * avg(CASE WHEN r = 1 THEN coverage END) AS coverage_best,
       100.0 * avg(CASE WHEN r = 2 THEN coverage END) AS coverage_second
FROM cov WHERE n >= 2
"""


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict]:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def tagmask_metrics(predictions: pa.Table, counts: pa.Table) -> list[dict]:
    """(metric, method, value) rows for a TagMask-style evaluation run."""
    con = duckdb.connect()
    con.register("eval_predictions", predictions)
    con.register("eval_counts", counts)
    out = []
    for row in _rows(con, TAG_CLASSIFICATION):
        for m in ("precision", "recall", "f1", "accuracy"):
            out.append({"metric": m, "method": row["method"], "value": row[m]})
    for row in _rows(con, TAG_MAP):
        out.append({"metric": "map", "method": row["method"], "value": row["map"]})
    for row in _rows(con, SINGLE_TAG_SHARE):
        out.append({"metric": "single_tag_share", "method": row["method"], "value": row["single_tag_share"]})
    for method, class_id in (("caption", CAPTION_CLASS_ID), ("selected_union", SELECTED_UNION_CLASS_ID)):
        seg = _rows(con, caption_segmentation_sql(class_id))[0]
        for m in ("caption_miou", "caption_mfpr", "caption_mfnr"):
            out.append({"metric": m, "method": method, "value": seg[m]})
    cov = _rows(con, TAG_COVERAGE)[0]
    for m in ("coverage_best", "coverage_second"):
        out.append({"metric": m, "method": "caption", "value": cov[m]})
    con.close()
    return [r for r in out if r["value"] is not None]
