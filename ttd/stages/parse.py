"""Stage `parse`: candidate tags from each shard's captions, into the `tags` and `captions` tables.

Per shard: read the captions (never the images), normalise and truncate them (`ttd.text.tags.clean_caption`), parse each
distinct caption once with spaCy (`ttd.text.tags.CaptionParser`), then commit `tags`, `captions` and `errors` together.
A shard is skipped when its manifest's fingerprint (stage, version, output-affecting config, spaCy model, compound
list, input files) is unchanged; a shard killed before its manifest is invisible and redone. With `workers > 1`,
shards go to that many processes, each loading the model once; each process commits its own shards.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttd.configs import ParseConfig
from ttd.corpus import Corpus, ReadIssue, ShardRef, ShardStats, open_corpus
from ttd.corpus.base import Caption
from ttd.stages.engine import (
    Held,
    PlannedShard,
    SerialWorker,
    StageSpec,
    Summary,
    WorkerSpec,
    finish_run,
    plan,
    run_claimed,
    run_here,
    run_processes,
)
from ttd.store import schemas
from ttd.store.store import Store
from ttd.text.nlp import english_model_id
from ttd.text.tags import CaptionParser, CleanCaption, TagColumns, clean_caption, compounds_digest

log = logging.getLogger(__name__)

STAGE = "parse"
STAGE_VERSION = 1


@dataclass
class ShardResult:
    """What parsing one shard produced, before it is committed."""

    tables: dict[str, pa.Table]
    stats: ShardStats
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), **self.counts}


# ---------------------------------------------------------------- one shard

def _issue_rows(key: str, source: str, c: CleanCaption, max_chars: int) -> list[dict[str, Any]]:
    """The `errors` rows a caption earns; none for a clean one."""
    rows = []

    def add(kind: str, message: str, severity: str = "warning") -> None:
        rows.append({"key": key, "stage": STAGE, "error_type": kind, "message": message, "severity": severity,
                     "source": source})

    if c.empty:
        what = "missing" if c.n_chars_original is None else ("empty" if not c.n_chars_original else
                                                               "only whitespace or control characters")
        add("empty_caption", f"caption is {what}: no candidate tags", "error")
        return rows
    if c.fixes:
        add("caption_normalised", f"fixed {', '.join(c.fixes)}; tag offsets index the stored caption "
                                  "(captions.caption)")
    if c.truncated:
        add("caption_truncated", f"caption has {c.n_chars_original} characters; only the first {len(c.text)} "
                                 f"were parsed (max_caption_chars={max_chars}, cut at a word boundary)")
    if c.likely_not_english:
        add("likely_not_english", f"{c.non_latin_share:.0%} of the letters are outside the Latin script; parsed "
                                  "with the English model anyway")
    return rows


def _tags_table(keys: list[str], cleans: list[CleanCaption], sample_text: np.ndarray, parsed: TagColumns,
                policy: str) -> tuple[pa.Table, np.ndarray]:
    """Every caption's candidates, one row each, gathered column-wise from the parsed distinct texts:
    `sample_text[i]` is sample i's row in `parsed` (-1: nothing parsed). Also returns candidates per sample."""
    per_text = parsed.counts(int(sample_text.max(initial=-1)) + 1)
    text_start = np.cumsum(per_text) - per_text
    has = sample_text >= 0
    counts = np.zeros(len(keys), dtype=np.int64)
    counts[has] = per_text[sample_text[has]]
    n_rows = int(counts.sum())
    first = np.cumsum(counts) - counts
    tag_index = np.arange(n_rows) - np.repeat(first, counts)
    rows = np.repeat(np.where(has, text_start[np.maximum(sample_text, 0)], 0), counts) + tag_index
    sample = np.repeat(np.arange(len(keys)), counts)
    cols = parsed.take(rows, sample).columns
    cols.update({
        "key": pc.take(pa.array(keys, pa.string()), pa.array(sample)),
        "tag_index": tag_index,
        "caption_truncated": np.fromiter((c.truncated for c in cleans), bool, len(cleans))[sample],
        "policy": pa.repeat(pa.scalar(policy), n_rows),
    })
    schema = schemas.get("tags").arrow
    arrays = {f.name: cols[f.name] if isinstance(cols[f.name], pa.Array) else pa.array(cols[f.name], f.type)
              for f in schema}
    return pa.table(arrays, schema=schema), counts


def _captions_table(keys: list[str], cleans: list[CleanCaption], n_candidates: np.ndarray, policy: str) -> pa.Table:
    schema = schemas.get("captions").arrow
    cols = {
        "key": keys,
        "caption": [c.text for c in cleans],
        "n_chars_original": [c.n_chars_original for c in cleans],
        "truncated": [c.truncated for c in cleans],
        "normalised": [c.changed for c in cleans],
        "likely_not_english": [c.likely_not_english for c in cleans],
        "n_candidates": n_candidates,
        "policy": [policy] * len(keys),
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


@contextmanager
def _gc_paused():
    """A shard allocates millions of short-lived, acyclic objects; the cyclic collector's full passes over the
    loaded model's objects then cost a fifth of the time. Paused per shard; cycles are collected afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_shard(corpus: Corpus, shard: ShardRef) -> tuple[list[Caption | ReadIssue], ShardStats]:
    """One shard's captions and read issues (the shard's I/O, which needs no parser)."""
    stats = ShardStats()
    return list(corpus.read_captions(shard, stats)), stats


def parse_shard(corpus: Corpus, shard: ShardRef, parser: CaptionParser, config: ParseConfig,
                read: tuple[list[Caption | ReadIssue], ShardStats] | None = None) -> ShardResult:
    """Turn one shard's captions (`read`, or read here) into the three tables; never raises for a bad sample."""
    items, stats = read or read_shard(corpus, shard)
    with _gc_paused():
        return _parse_shard(items, stats, parser, config)


def _parse_shard(items: list[Caption | ReadIssue], stats: ShardStats, parser: CaptionParser,
                 config: ParseConfig) -> ShardResult:
    errors: list[dict[str, Any]] = []
    keys: list[str] = []
    cleans: list[CleanCaption] = []
    caption_rows: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, ReadIssue):
            errors.append(item.as_row(stage=STAGE))
            continue
        clean = clean_caption(item.caption, config.max_caption_chars)
        if clean.empty or clean.fixes or clean.truncated or clean.non_latin_share:
            caption_rows.extend(_issue_rows(item.key, item.source, clean, config.max_caption_chars))
        keys.append(item.key)
        cleans.append(clean)
    n_read = len(errors)
    errors.extend(caption_rows)
    todo = [i for i, c in enumerate(cleans) if not c.empty]
    before = parser.parsed
    sample_text = np.full(len(cleans), -1, dtype=np.int64)
    if config.deduplicate:  # each distinct caption once (the tagger path also remembers recent ones across shards)
        distinct: dict[str, int] = {}
        for i in todo:
            sample_text[i] = distinct.setdefault(cleans[i].text, len(distinct))
        texts = list(distinct)
    else:
        sample_text[todo] = np.arange(len(todo))
        texts = [cleans[i].text for i in todo]
    parsed = parser.parse_columns(texts, dedupe=config.deduplicate)
    failed = np.zeros(len(cleans), dtype=bool)
    if parsed.failed:
        for i in np.flatnonzero(np.isin(sample_text, list(parsed.failed))).tolist():
            r = parsed.failed[int(sample_text[i])]
            failed[i] = True
            errors.append({"key": keys[i], "stage": STAGE, "error_type": "parse_failed", "severity": "error",
                           "message": f"spaCy failed: {type(r).__name__}: {r}"[:500], "source": ""})
        sample_text[failed] = -1
    tags, n_candidates = _tags_table(keys, cleans, sample_text, parsed, config.policy)
    counts = {
        "captions": len(keys),
        "parsed": parser.parsed - before,
        "tags": tags.num_rows,
        "empty": sum(c.empty for c in cleans),
        "truncated": sum(c.truncated for c in cleans),
        "normalised": sum(bool(c.fixes) for c in cleans),
        "not_english": sum(c.likely_not_english for c in cleans),
        "parse_failed": int(failed.sum()),
    }
    for row in errors[n_read:]:  # read issues were counted by the reader
        if row["severity"] == "error":
            stats.errors += 1
        else:
            stats.warnings += 1
    tables = {"tags": tags, "captions": _captions_table(keys, cleans, n_candidates, config.policy),
              "errors": pa.Table.from_pylist(errors, schema=schemas.get("errors").arrow)}
    return ShardResult(tables, stats, counts)


def commit_shard(store: Store, shard: ShardRef, fp: str, result: ShardResult, config: ParseConfig,
                 model_id: str, *, fresh: bool = False) -> None:
    store.commit(STAGE, shard.partition, fp, result.tables, stage_version=STAGE_VERSION,
                 config={**config.output_config(), "stats": result.as_dict()}, model_id=model_id,
                 input_fingerprint=shard.fingerprint, fresh=fresh)


# ---------------------------------------------------------------- the stage

def stage_spec(config: ParseConfig, model_id: str) -> StageSpec:
    """What parse's fingerprint covers: its output-affecting config, the compound list in use, the spaCy model."""
    fp_config = {**config.output_config(), "compound_list": compounds_digest() if config.compounds else None}
    return StageSpec(STAGE, STAGE_VERSION, fp_config, model_id)


class ParseWorker(SerialWorker):
    """Loads spaCy once, then parses and commits shards; `io_threads` shards at once, so their store and corpus
    requests overlap while one shard at a time holds the parser."""

    def __init__(self, corpus: dict[str, str], store_uri: str, config: dict[str, Any], model_id: str,
                 io_threads: int = 1):
        super().__init__()
        self.config = ParseConfig(**config)
        self.parser = CaptionParser.from_config(self.config)
        self.corpus = open_corpus(corpus["uri"], fmt=corpus["format"], name=corpus["name"])
        self.store, self.model_id, self.threads = Store(store_uri), model_id, io_threads

    def process_one(self, job: PlannedShard) -> dict[str, Any]:
        def work(held: Held) -> dict[str, Any]:
            read = read_shard(self.corpus, job.shard)  # the shard's reads, outside the parser's lock
            with self.compute_lock:
                result = parse_shard(self.corpus, job.shard, self.parser, self.config, read)
            commit_shard(self.store, job.shard, job.fingerprint, result, self.config, self.model_id,
                         fresh=held.fresh)
            return result.as_dict()

        return run_claimed(self.store, STAGE, job, work)


SUMMED = ("samples", "captions", "parsed", "tags", "errors", "warnings", "empty", "truncated", "normalised",
          "not_english", "parse_failed")


def run_parse(
    corpus_uri: str,
    store_uri: str,
    config: ParseConfig | None = None,
    *,
    fmt: str = "auto",
    name: str | None = None,
    include_incomplete: bool = False,
    shards: Collection[str] | None = None,
    planned: list[PlannedShard] | None = None,
    io_threads: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Parse every shard not yet done under this config; returns a summary of what was done and skipped.
    `shards` limits the run to those shard names; `planned` hands it shards a flow planned already (no planning
    here). `progress(result)` is called once per shard worked on; `on_start(n)` once the parser is loaded and n
    shards are to be parsed. `io_threads`: shards in flight per process (default: 8 on an object store, where a
    small shard's time is mostly requests; 1 on local disk). A shard that fails as a whole (an unreadable file, a
    failed write) is listed in `failed` and left uncommitted for the next run; the other shards go on."""
    config = config or ParseConfig()
    corpus = open_corpus(corpus_uri, fmt=fmt, name=name)
    store = Store(store_uri, create=True)
    store.register_corpus(corpus.name, corpus.uri, corpus.format)
    model_id = english_model_id()
    summary = Summary(STAGE, corpus.name, SUMMED, progress=progress,
                      extra={"format": corpus.format, **config.output_config(), "model_id": model_id,
                             "workers": config.workers})
    if planned is None:
        planned = plan(corpus, store, stage_spec(config, model_id), include_incomplete=include_incomplete,
                       shards=shards)
    todo = summary.planned(planned)
    if io_threads is None:
        io_threads = 1 if store.root.protocol == "file" and corpus.loc.protocol == "file" else 8
    spec = WorkerSpec(ParseWorker, ({"uri": corpus.uri, "format": corpus.format, "name": corpus.name}, store_uri,
                                    config.model_dump(), model_id, io_threads))
    if todo and config.workers > 1 and len(todo) > 1:
        run_processes(spec, todo, config.workers, summary.account, on_start, preload=["ttd.text.tags", "spacy"])
    elif todo:
        run_here(spec, todo, summary.account, on_start)
    elif on_start:
        on_start(0)
    finish_run(store, STAGE, corpus.name, summary.counts["done"])
    out = summary.as_dict()
    out["captions_per_s"] = round(out["captions"] / out["seconds"], 1) if out["seconds"] else 0.0
    log.info("parse %s: %d shard(s) committed, %d already done, %d waiting; %d captions, %d error row(s), "
             "%.1f captions/s", corpus.name, out["done"], out["skipped_done"], len(out["waiting"]),
             out["captions"], out["errors"], out["captions_per_s"])
    return out
