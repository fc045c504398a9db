"""`ttd report`: what a store holds, as `report.md` and a self-contained `report.html` with PNG charts beside them.

Contents: the store's stages (from its manifests) and errors by stage and type; every evaluation run in `metrics`
(TagMask tag selection and caption segmentation, and segmentation benchmarks), with a side-by-side comparison and a
difference column when there are two or more runs; charts (F1 per scoring method, coverage of the best and second
tag, segmentation mIoU, training loss from `train_log`); and heatmap overlays of a few scored samples drawn by
`ttd.report.show`. Everything is read through the store (`Store.read`/`Store.dataset`), with the bigger tables
aggregated by DuckDB queries over their Arrow datasets rather than loaded whole.

The content is built once as a list of blocks (headings, paragraphs, tables, images) and rendered twice, as Markdown
and as HTML, so the two files always say the same thing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds

from ttd import __version__
from ttd.errors import TTDError
from ttd.store.store import Store

log = logging.getLogger(__name__)

DEFAULT_OUT = "ttd-report"
TAGMASK = "tagmask"
SCORING = (("image", "image-tag"), ("text", "text-tag"), ("pixel", "pixel-tag"), ("noun", "noun parsing"))
TAG_METRICS = (("precision", "P"), ("recall", "R"), ("f1", "F1"), ("accuracy", "Acc"), ("map", "mAP"))
CAPTION_METRICS = (("caption_miou", "mIoU"), ("caption_mfpr", "mFPR"), ("caption_mfnr", "mFNR"))
UNION_LABEL = "selected tags' union (L_distill target)"
COVERAGE_METRICS = (("coverage_best", "coverage of best tag"), ("coverage_second", "coverage of second tag"))
SEG_METRICS = (("miou", "mIoU"), ("mfpr", "mFPR"), ("mfnr", "mFNR"), ("aacc", "aAcc"), ("macc", "mAcc"))
MAX_CURVE_POINTS = 500  # per training run; longer logs are averaged into this many buckets


# ---- the document -----------------------------------------------------------------------------------------------
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # `backticks` mark code


@dataclass
class TableBlock:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns


@dataclass
class ImageBlock:
    src: str  # relative to the report folder
    alt: str


Block = Heading | Para | TableBlock | ImageBlock


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, TableBlock):
            aligns = [("---:" if b.numeric and b.numeric[i] else "---") for i in range(len(b.headers))]
            lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |", "|" + "|".join(aligns) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, ImageBlock):
            out.append(f"![{b.alt}]({b.src})")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0 1em; }
"""


def _embedded(src: str, base: Path | None) -> str:
    """A PNG as a data: URI, so report.html is one file that can be sent on its own; the path when it is missing."""
    path = base / src if base is not None else None
    if path is None or not path.is_file():
        return src
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: Sequence[Block], title: str, base: Path | None = None) -> str:
    """The page; with `base` (the folder the PNGs were written to) every image is embedded in it."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, TableBlock):
            num = [bool(b.numeric and b.numeric[i]) for i in range(len(b.headers))]
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in b.headers) + "</tr>")
            for row in b.rows:
                out.append("<tr>" + "".join(
                    f'<td class="num">{_inline_html(c)}</td>' if num[i] else f"<td>{_inline_html(c)}</td>"
                    for i, c in enumerate(row)) + "</tr>")
            out.append("</table>")
        elif isinstance(b, ImageBlock):
            src = _embedded(b.src, base)
            out.append(f'<p><img src="{html.escape(src, quote=True)}" alt="{html.escape(b.alt, quote=True)}"></p>')
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ---- numbers ----------------------------------------------------------------------------------------------------
def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def fmt(v: float | None) -> str:
    return f"{v:.2f}" if _ok(v) else "-"


def fmt_diff(b: float | None, a: float | None) -> str:
    return f"{b - a:+.2f}" if _ok(a) and _ok(b) else "-"


# ---- tags and pseudo-labels -------------------------------------------------------------------------------------
TOP_CANDIDATES = 15


def tag_blocks(con: duckdb.DuckDBPyConnection, out: Path) -> tuple[list[Block], list[str]]:
    """The corpus as parse and score saw it: the most frequent candidates and how often each was selected, the
    selection rate by part of speech and for stop words, the pixel-score distribution of selected and rejected
    candidates, and masks per sample. Reads `tags`, `relevancy` and `masks` only (no eval split needed)."""
    from ttd.report import plots

    blocks: list[Block] = [Heading(2, "Tags and pseudo-labels")]
    size = _rows(con, "SELECT count(*) AS n, count(DISTINCT (corpus, shard, key)) AS captions FROM tags")[0]
    if not size["n"]:
        blocks.append(Para("No tags in this store yet (`ttd parse` writes them)."))
        return blocks, []
    n_scored = _rows(con, "SELECT count(DISTINCT (corpus, shard, key)) AS n FROM relevancy")[0]["n"]
    join = ("FROM tags t LEFT JOIN relevancy r USING (corpus, shard, key, tag_index)" if n_scored else "FROM tags t")
    sel = "100.0 * avg(r.selected::INT)" if n_scored else "NULL"
    blocks.append(Para(f"{size['n']:,} candidate tags in {size['captions']:,} captions "
                       f"({size['n'] / size['captions']:.1f} per caption)"
                       + ("; selection rates are pixel-tag scoring's (`relevancy.selected`)." if n_scored
                          else "; not scored yet (`ttd score` adds selection rates).")))
    top = _rows(con, f"SELECT lower(t.lemma) AS w, count(*) AS n, {sel} AS rate, bool_or(t.is_stop) AS stop {join} "
                     f"GROUP BY 1 ORDER BY n DESC, w LIMIT {TOP_CANDIDATES}")
    blocks.append(Heading(3, f"The {TOP_CANDIDATES} most frequent candidates"))
    blocks.append(TableBlock(["lemma", "candidates", "selected (%)", "stop word"],
                             [[r["w"], f"{r['n']:,}", fmt(r["rate"]), "yes" if r["stop"] else ""] for r in top],
                             [False, True, True, False]))
    by_pos = _rows(con, f"SELECT t.pos, t.is_stop, count(*) AS n, {sel} AS rate {join} GROUP BY 1, 2 "
                        "ORDER BY n DESC, 1, 2")
    blocks.append(Heading(3, "Selection by part of speech and stop word"))
    blocks.append(TableBlock(["part of speech", "stop word", "candidates", "selected (%)"],
                             [[r["pos"] or "-", "yes" if r["is_stop"] else "no", f"{r['n']:,}", fmt(r["rate"])]
                              for r in by_pos],
                             [False, False, True, True]))
    if not n_scored:
        return blocks, []
    masks = _rows(con, "SELECT count(*) AS n, count(DISTINCT (corpus, shard, key)) AS samples, "
                       "avg(octet_length(heatmap)) AS bytes FROM masks")[0]
    blocks.append(Para(f"Pseudo-labels: {masks['n']:,} masks for {n_scored:,} scored samples "
                       f"({masks['n'] / n_scored:.2f} per sample; {n_scored - masks['samples']:,} samples with "
                       f"none), {(masks['bytes'] or 0):.0f} bytes per mask."))
    edges = [i / 20 for i in range(21)]
    counts = {label: [0] * 20 for label in ("selected", "rejected")}
    for r in _rows(con, "SELECT selected, least(floor(pixel_score * 20), 19)::INT AS bin, count(*) AS n "
                        "FROM relevancy WHERE pixel_score IS NOT NULL GROUP BY 1, 2"):
        counts["selected" if r["selected"] else "rejected"][r["bin"]] += r["n"]
    png = plots.histogram(out / "pixel_scores.png", edges, counts, title="Pixel-tag score of every candidate",
                          xlabel="normalised pixel score", ylabel="candidates")
    blocks.append(ImageBlock("pixel_scores.png", "pixel-tag score distribution, selected and rejected candidates"))
    return blocks, [png]


# ---- what the store holds ---------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    run: str
    dataset: str
    model_id: str
    head: str | None
    committed_at: str
    metrics: dict[str, Any]  # tagmask: method -> metric -> value; segmentation: metric -> value
    samples: int | None = None
    label: str = ""
    role: str | None = None  # "base model", "TTD", ... as the evaluation recorded it


    @property
    def is_tagmask(self) -> bool:
        return self.dataset == TAGMASK

    @property
    def name(self) -> str:
        return f"{self.label} {self.role} ({self.run[:8]})" if self.role else f"{self.label} ({self.run[:8]})"

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "role": self.role, "run": self.run, "dataset": self.dataset,
                "model_id": self.model_id,
                "head": self.head, "committed_at": self.committed_at, "samples": self.samples,
                "metrics": self.metrics}


def _when(iso: str) -> str:
    """A commit time for people: to the second (manifests keep microseconds so runs committed within one second
    still sort in commit order)."""
    return iso[:19].replace("T", " ") if iso else "-"


def _labels(n: int) -> list[str]:
    letters = [chr(ord("A") + i) for i in range(26)]
    return [letters[i] if n <= 26 else f"R{i + 1}" for i in range(n)]


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _connect(store: Store, tables: Sequence[str]) -> duckdb.DuckDBPyConnection:
    """DuckDB over the store's committed files: each table is its Arrow dataset, so filters and projections push
    down and aggregates stream instead of loading the table."""
    con = duckdb.connect()
    for name in tables:
        con.register(name, store.dataset(name))
    return con


def _head(manifest: dict | None, fallback: str | None) -> str | None:
    cfg = (manifest or {}).get("config") or {}
    return (cfg.get("score") or {}).get("head") or cfg.get("head") or fallback


def _resolve_runs(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    chosen = []
    for w in wanted:
        hits = [r for r in available if r == w] or [r for r in available if r.startswith(w)]
        if len(hits) != 1:
            what = "matches no run" if not hits else f"matches {len(hits)} runs"
            raise TTDError(f"--runs {w!r} {what} in the store's metrics (runs: {', '.join(available) or 'none'}); "
                           "give run ids from `ttd sql --store … \"SELECT DISTINCT run FROM metrics\"`")
        chosen.append(hits[0])
    return chosen


def eval_runs(store: Store, con: duckdb.DuckDBPyConnection, manifests: list[dict],
              wanted: Sequence[str] | None = None) -> list[EvalRun]:
    """Every run in `metrics`, in evaluation order (commit time, then run id) or in the order `wanted` gives."""
    from ttd.eval.tagmask import metrics_dict  # imports torch: only when there is something to report

    rows = store.read("metrics", columns=["run", "dataset", "method", "metric", "value", "model_id"]).to_pylist()
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    by_manifest = {m["run"]: m for m in manifests if m.get("run") and m.get("stage") == "evaluate"}
    by_manifest.update({m["run"]: m for m in manifests if m.get("run") and m["run"] not in by_manifest})
    samples = {r["run"]: r["n"] for r in _rows(
        con, "SELECT run, count(DISTINCT key) AS n FROM eval_predictions GROUP BY run")}
    runs = []
    for run, rs in by_run.items():
        m = by_manifest.get(run)
        dataset = rs[0]["dataset"]
        if dataset == TAGMASK:
            metrics: dict[str, Any] = metrics_dict(rs)
            n = samples.get(run)
        else:
            metrics = {r["metric"]: round(float(r["value"]), 3) for r in rs}
            n = int(metrics.pop("images")) if _ok(metrics.get("images")) else None
        runs.append(EvalRun(run=run, dataset=dataset, model_id=rs[0]["model_id"],
                            head=_head(m, None if dataset == TAGMASK else rs[0]["method"]),
                            committed_at=(m or {}).get("committed_at", ""), metrics=metrics, samples=n,
                            role=((m or {}).get("config") or {}).get("role")))
    if wanted:
        order = _resolve_runs(wanted, sorted(by_run))
        index = {r.run: r for r in runs}
        runs = [index[r] for r in order]
    else:
        runs.sort(key=lambda r: (r.committed_at, r.run))
    for r, label in zip(runs, _labels(len(runs))):
        r.label = label
    return runs


def stage_rows(manifests: list[dict]) -> list[list[str]]:
    stages: dict[str, list[dict]] = {}
    for m in manifests:
        stages.setdefault(m.get("stage", "?"), []).append(m)
    out = []
    for stage, ms in sorted(stages.items()):
        corpora = sorted({m["corpus"] for m in ms if m.get("corpus")})
        runs = sum(1 for m in ms if m.get("run"))
        models = sorted({m["model_id"] for m in ms if m.get("model_id")})
        out.append([stage, str(len(ms)), ", ".join(corpora) or "-", str(runs) if runs else "-",
                    ", ".join(models) or "-", _when(max(m.get("committed_at", "") for m in ms))])
    return out


def error_rows(con: duckdb.DuckDBPyConnection) -> list[dict]:
    return _rows(con, "SELECT stage, error_type, severity, count(*) AS n, count(DISTINCT key) AS samples "
                      "FROM errors GROUP BY ALL ORDER BY n DESC, stage, error_type, severity")


def training_curves(con: duckdb.DuckDBPyConnection) -> tuple[list[dict], dict[str, dict[str, list]]]:
    """Per run: a summary row, and its loss curve (averaged into at most MAX_CURVE_POINTS buckets)."""
    summary = _rows(con, "SELECT run, count(*) AS logged, max(step) AS steps, arg_min(loss, step) AS first_loss, "
                         "arg_max(loss, step) AS last_loss, min(loss) AS min_loss, "
                         "avg(samples_per_s) AS samples_per_s FROM train_log GROUP BY run ORDER BY run")
    points = _rows(con, f"""
        WITH r AS (SELECT run, min(step) AS lo, max(step) AS hi, count(*) AS n FROM train_log GROUP BY run)
        SELECT t.run, min(t.step) AS step, avg(t.loss) AS loss, avg(t.loss_distill) AS loss_distill,
               avg(t.loss_tag) AS loss_tag
        FROM train_log t JOIN r USING (run)
        GROUP BY t.run, CASE WHEN r.n <= {MAX_CURVE_POINTS} THEN t.step
                             ELSE floor((t.step - r.lo) * {MAX_CURVE_POINTS}.0 / (r.hi - r.lo + 1)) END
        ORDER BY t.run, step""")
    curves: dict[str, dict[str, list]] = {}
    for p in points:
        c = curves.setdefault(p["run"], {"step": [], "loss": [], "loss_distill": [], "loss_tag": []})
        for k in c:
            c[k].append(p[k])
    return summary, curves


def sample_keys(store: Store, manifests: list[dict], n: int) -> list[str]:
    """The first `n` keys, in (corpus, shard, key) order, that have stored heatmaps (else relevancy rows); only as
    many shards are read as it takes."""
    if n <= 0:
        return []
    shards = sorted({(m["corpus"], m["shard"]) for m in manifests
                     if m.get("stage") == "score" and m.get("corpus") and m.get("shard")})
    for table in ("masks", "relevancy"):
        keys: list[str] = []
        for corpus, shard in shards:
            where = (ds.field("corpus") == corpus) & (ds.field("shard") == shard)
            got = store.read(table, columns=["key"], filter=where)["key"].unique().to_pylist()
            keys += [k for k in sorted(got) if k not in keys]
            if len(keys) >= n:
                break
        if keys:
            return keys[:n]
    return []


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "sample"


# ---- sections ---------------------------------------------------------------------------------------------------
def _tagmask_tables(r: EvalRun) -> list[Block]:
    rows = []
    for method, label in SCORING:
        m = r.metrics.get(method, {})
        rows.append([label] + [fmt(m.get(k)) for k, _ in TAG_METRICS] + [fmt(m.get("single_tag_share"))])
    c, u = r.metrics.get("caption", {}), r.metrics.get("selected_union", {})
    seg_rows = [["caption"] + [fmt(c.get(k)) for k, _ in CAPTION_METRICS + COVERAGE_METRICS]]
    if u:  # runs before evaluate version 2 have no union row
        seg_rows.append([UNION_LABEL] + [fmt(u.get(k)) for k, _ in CAPTION_METRICS] + ["-"] * len(COVERAGE_METRICS))
    return [
        TableBlock(["tag selection"] + [h for _, h in TAG_METRICS] + ["single-tag share"], rows,
                   [False] + [True] * (len(TAG_METRICS) + 1)),
        TableBlock(["caption heatmap"] + [h for _, h in CAPTION_METRICS] + [h for _, h in COVERAGE_METRICS],
                   seg_rows, [False] + [True] * (len(CAPTION_METRICS) + len(COVERAGE_METRICS))),
    ]


def _compare_headers(runs: list[EvalRun], first: list[str]) -> tuple[list[str], list[bool]]:
    base = runs[0]
    heads = first + [r.name for r in runs] + [f"Δ {r.label} − {base.label}" for r in runs[1:]]
    return heads, [False] * len(first) + [True] * (len(heads) - len(first))


def _compare_row(first: list[str], values: list[float | None]) -> list[str]:
    return first + [fmt(v) for v in values] + [fmt_diff(v, values[0]) for v in values[1:]]


def comparison_tables(runs: list[EvalRun]) -> list[Block]:
    """The paper-style table, run against run: tag selection, caption segmentation, single-tag-bias diagnostics;
    every later run minus the first."""
    blocks: list[Block] = [Heading(3, "Tag selection")]
    heads, num = _compare_headers(runs, ["scoring", "metric"])
    rows = [_compare_row([label, h], [r.metrics.get(method, {}).get(k) for r in runs])
            for method, label in SCORING for k, h in TAG_METRICS
            if any(_ok(r.metrics.get(method, {}).get(k)) for r in runs)]
    blocks.append(TableBlock(heads, rows, num))
    blocks.append(Heading(3, "Caption segmentation"))
    heads, num = _compare_headers(runs, ["metric"])
    rows = [_compare_row([h], [r.metrics.get("caption", {}).get(k) for r in runs]) for k, h in CAPTION_METRICS]
    rows += [_compare_row([f"{h}, {UNION_LABEL}"], [r.metrics.get("selected_union", {}).get(k) for r in runs])
             for k, h in CAPTION_METRICS if any(_ok(r.metrics.get("selected_union", {}).get(k)) for r in runs)]
    blocks.append(TableBlock(heads, rows, num))
    blocks.append(Heading(3, "Single tag bias"))
    blocks.append(Para("Single-tag share: among captions with two or more true tags, the percentage where at most "
                       "one is selected (lower is better). Coverage: how much of the best- and second-best-covered "
                       "true tag's region the caption heatmap covers (a second-tag coverage close to the best one "
                       "means the caption attends to several objects)."))
    heads, num = _compare_headers(runs, ["diagnostic"])
    rows = [_compare_row([f"single-tag share, {label}"], [r.metrics.get(method, {}).get("single_tag_share")
                                                           for r in runs])
            for method, label in SCORING if any(_ok(r.metrics.get(method, {}).get("single_tag_share")) for r in runs)]
    rows += [_compare_row([h], [r.metrics.get("caption", {}).get(k) for r in runs]) for k, h in COVERAGE_METRICS]
    blocks.append(TableBlock(heads, rows, num))
    return blocks


def segmentation_blocks(runs: list[EvalRun]) -> list[Block]:
    blocks: list[Block] = []
    for dataset in sorted({r.dataset for r in runs}):
        rs = [r for r in runs if r.dataset == dataset]
        blocks.append(Heading(3, dataset))
        heads = ["run", "model", "head", "images"] + [h for _, h in SEG_METRICS]
        rows = [[r.name, r.model_id, r.head or "-", str(r.samples or "-")] + [fmt(r.metrics.get(k))
                                                                              for k, _ in SEG_METRICS] for r in rs]
        rows += [[f"Δ {r.label} − {rs[0].label}", "", "", ""] + [fmt_diff(r.metrics.get(k), rs[0].metrics.get(k))
                                                                 for k, _ in SEG_METRICS] for r in rs[1:]]
        blocks.append(TableBlock(heads, rows, [False, False, False, True] + [True] * len(SEG_METRICS)))
    return blocks


# ---- the report ---------------------------------------------------------------------------------------------------
def build_report(store_uri: str, out_dir: str | Path = DEFAULT_OUT, *, samples: int = 4,
                 runs: Sequence[str] | None = None) -> dict[str, Any]:
    """Write OUT/report.md, OUT/report.html and their PNGs; return the paths and the runs shown."""
    if samples < 0:
        raise TTDError(f"--samples must be >= 0, got {samples}")
    store = Store(store_uri)  # a missing store or a folder that is not one is a TTDError here
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TTDError(f"--out {str(out)!r} is a file: give a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    from ttd.report import plots  # matplotlib, and torch through ttd.report.show: only once the store is known to exist
    from ttd.report.show import render

    manifests = store.manifests()
    con = _connect(store, ("errors", "eval_predictions", "train_log", "tags", "relevancy", "masks"))
    generated = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    pngs: list[str] = []

    blocks: list[Block] = [Heading(1, "TTD store report"),
                           Para(f"Store `{store_uri}`, generated {generated} by ttd {__version__}.")]

    # header: stages and errors
    blocks.append(Heading(2, "Stages"))
    srows = stage_rows(manifests)
    if srows:
        blocks.append(TableBlock(["stage", "shards / runs committed", "corpora", "runs", "models", "latest commit"],
                                 srows, [False, True, False, True, False, False]))
    else:
        blocks.append(Para("Nothing has been committed to this store yet."))
    blocks.append(Heading(2, "Errors"))
    erows = error_rows(con)
    if erows:
        blocks.append(TableBlock(["stage", "error type", "severity", "rows", "samples"],
                                 [[e["stage"], e["error_type"], e["severity"], str(e["n"]), str(e["samples"])]
                                  for e in erows], [False, False, False, True, True]))
    else:
        blocks.append(Para("No errors recorded."))

    # tags and pseudo-labels: what parse and score made of the corpus, with or without an eval split
    tag_section, tag_png = tag_blocks(con, out)
    blocks += tag_section
    pngs += tag_png

    # evaluation runs
    all_runs = eval_runs(store, con, manifests, runs)
    tag_runs = [r for r in all_runs if r.is_tagmask]
    seg_runs = [r for r in all_runs if not r.is_tagmask]
    blocks.append(Heading(2, "Evaluation runs"))
    if not all_runs:
        blocks.append(Para("There are no metrics in this store yet: run `ttd evaluate --dataset tagmask --root EVAL "
                           f"--store {store_uri}` (or a segmentation benchmark) to add an evaluation run."))
    else:
        blocks.append(TableBlock(["run", "what", "id", "dataset", "model", "head", "samples", "evaluated"],
                                 [[r.label, r.role or "-", r.run, r.dataset, r.model_id, r.head or "-",
                                   str(r.samples or "-"), _when(r.committed_at)] for r in all_runs],
                                 [False, False, False, False, False, False, True, False]))
    if tag_runs:
        blocks.append(Heading(2, "TagMask: tag selection and caption segmentation"))
        blocks.append(Para("Percentages. Tag selection is micro-averaged over every candidate word; mAP ranks each "
                           "caption's words by score; the caption heatmap is compared with the union of its visible "
                           "tags' masks (docs/METHOD.md)."))
        for r in tag_runs:
            blocks.append(Heading(3, f"Run {r.name}: {r.model_id}" + (f", head {r.head}" if r.head else "")))
            blocks += _tagmask_tables(r)
        if len(tag_runs) >= 2:
            blocks.append(Heading(2, "TagMask comparison"))
            blocks.append(Para(f"Every run against run {tag_runs[0].label}; the Δ columns are that run minus "
                               f"{tag_runs[0].label}."))
            blocks += comparison_tables(tag_runs)
        names = {r.name + " " + r.model_id: r for r in tag_runs}
        pngs.append(plots.grouped_bars(out / "f1.png", [label for _, label in SCORING],
                                       {n: [r.metrics.get(m, {}).get("f1") for m, _ in SCORING]
                                        for n, r in names.items()},
                                       title="Tag selection F1 per scoring method", ylabel="F1 (%)"))
        pngs.append(plots.grouped_bars(out / "coverage.png", [r.name for r in tag_runs],
                                       {label: [r.metrics.get("caption", {}).get(k) for r in tag_runs]
                                        for k, label in COVERAGE_METRICS},
                                       title="Caption heatmap: coverage of the best vs the second tag",
                                       ylabel="coverage (%)"))
        blocks.append(Heading(3, "Charts"))
        blocks.append(ImageBlock("f1.png", "F1 per scoring method and run"))
        blocks.append(ImageBlock("coverage.png", "coverage of the best and second tag per run"))
    if seg_runs:
        blocks.append(Heading(2, "Segmentation benchmarks"))
        blocks.append(Para("Percentages over the dataset's classes (docs/SEGEVAL.md)."))
        blocks += segmentation_blocks(seg_runs)
        datasets = sorted({r.dataset for r in seg_runs})
        pngs.append(plots.grouped_bars(out / "segmentation.png", datasets,
                                       {r.name + " " + r.model_id: [r.metrics.get("miou") if r.dataset == d else None
                                                                    for d in datasets] for r in seg_runs},
                                       title="Segmentation mIoU", ylabel="mIoU (%)"))
        blocks.append(ImageBlock("segmentation.png", "segmentation mIoU per dataset and run"))

    # training
    blocks.append(Heading(2, "Training"))
    tsummary, curves = training_curves(con)
    if tsummary:
        blocks.append(TableBlock(["run", "logged steps", "last step", "first loss", "last loss", "lowest loss",
                                  "samples/s"],
                                 [[t["run"], str(t["logged"]), str(t["steps"]), fmt(t["first_loss"]),
                                   fmt(t["last_loss"]), fmt(t["min_loss"]), fmt(t["samples_per_s"])]
                                  for t in tsummary], [False] + [True] * 6))
        labels = {m["run"]: f"{m['run']} ({m.get('stage')}{', ' + m['model_id'] if m.get('model_id') else ''})"
                  for m in manifests if m.get("run") and m.get("files", {}).get("train_log")}
        pngs.append(plots.loss_curves(out / "training.png", {labels.get(r, r): c for r, c in curves.items()}))
        blocks.append(ImageBlock("training.png", "training loss against step"))
    else:
        blocks.append(Para("No training runs logged in `train_log` yet (`ttd distill` writes them)."))

    # samples
    blocks.append(Heading(2, "Samples"))
    keys = sample_keys(store, manifests, samples)
    sample_pngs = []
    if keys:
        (out / "samples").mkdir(exist_ok=True)
        blocks.append(Para("Image, caption, candidate tags with their pixel/image/text scores and the stored tag "
                           "heatmaps (as `ttd show` draws them), for the first scored keys."))
        for i, key in enumerate(keys):
            rel = f"samples/{i:02d}-{_safe(key)}.png"
            try:
                sample_pngs.append(render(store_uri, key, str(out / rel)))
            except TTDError as exc:
                log.warning("sample %s not drawn: %s", key, exc)
                blocks.append(Para(f"Sample `{key}`: not drawn ({exc})."))
                continue
            blocks.append(Heading(3, f"Sample `{key}`"))
            blocks.append(ImageBlock(rel, f"sample {key}"))
    elif samples:
        blocks.append(Para("No scored samples in this store yet (`ttd score` writes them)."))
    con.close()

    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, f"TTD report: {store_uri}", base=out), encoding="utf-8")
    return {"markdown": str(md), "html": str(page), "out": str(out), "generated": generated,
            "plots": pngs, "samples": sample_pngs, "runs": [r.as_json() for r in all_runs],
            "stages": [row[0] for row in srows], "errors": sum(e["n"] for e in erows)}


__all__ = ["DEFAULT_OUT", "build_report", "to_html", "to_markdown"]
