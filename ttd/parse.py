"""Stage `parse`: candidate tags from each shard's captions, into the `tags` and `captions` tables.

Per shard: read the captions (never the images), normalise and truncate them (`ttd.tags.clean_caption`), parse each
distinct caption once with spaCy (`ttd.tags.CaptionParser`), then commit `tags`, `captions` and `errors` together.
A shard is skipped when its manifest's fingerprint (stage, version, output-affecting config, spaCy model, compound
list, input files) is unchanged; a shard killed before its manifest is invisible and redone. With `workers > 1`,
shards go to that many processes, each loading the model once; each process commits its own shards.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
from pydantic import Field

from . import schemas
from .claims import claim, clear_stale
from .corpus import Corpus, ReadIssue, ShardRef, ShardStats, open_corpus
from .corpus.base import select_planned
from .errors import TTDError
from .nlp import english_model_id
from .store import Store, fingerprint
from .tags import CaptionParser, CleanCaption, TagColumns, clean_caption, compounds_digest

log = logging.getLogger(__name__)

STAGE = "parse"
STAGE_VERSION = 1
OUTPUT_FIELDS = ("policy", "tagger", "compounds", "noun_pairs", "max_caption_chars")


class ParseConfig(pydantic.BaseModel):
    """How candidates are made. Only OUTPUT_FIELDS change the output (and so the fingerprint); the rest is speed."""

    model_config = pydantic.ConfigDict(extra="forbid")

    policy: Literal["words", "content", "nouns"] = Field(
        "words", description="words: every word (stop words flagged, not dropped), as in the paper; content: no "
                             "stop words; nouns: nouns and proper nouns only (the paper's noun-parsing baseline).")
    tagger: bool = Field(True, description="Run spaCy's tagger and lemmatizer (POS, lemmas). False: tokenizer only, "
                                           "pos null and lemma = lower-case form; about 10x faster.")
    compounds: bool = Field(False, description="Also merge the multi-word nouns listed in "
                            "ttd/data/compound_nouns.txt ('hot dog', 'teddy bear'). Off by default: the list was "
                            "written alongside TagMask-Synth and holds every multi-word name of its vocabulary, which "
                            "flatters the noun baseline there.")
    noun_pairs: bool = Field(True, description="With the tagger: merge two adjacent nouns into one candidate ('fire "
                                               "truck', 'dog bed'), the general compound rule, no list needed.")
    max_caption_chars: int = Field(1000, ge=16, le=1_000_000,
                                   description="Longer captions are cut at a word boundary and flagged.")
    batch_size: int = Field(256, ge=1, le=100_000, description="Captions per spaCy batch (nlp.pipe).")
    workers: int = Field(1, ge=1, le=512, description="Processes across shards; each loads the model once.")
    dedupe: bool | None = Field(None, description="Parse each distinct caption once per shard (and recent ones "
                                                  "across shards). Default: on with the tagger; off without it, "
                                                  "where finding duplicates costs more than tokenising them "
                                                  "(measured: 17,000 vs 19,700 captions/s).")
    cache_size: int = Field(100_000, ge=0, description="Distinct captions remembered across shards per process.")

    @pydantic.model_validator(mode="after")
    def _nouns_need_the_tagger(self) -> ParseConfig:
        if self.policy == "nouns" and not self.tagger:
            raise ValueError("policy 'nouns' needs POS tags: run with the tagger (drop --no-tagger), or use policy "
                             "words or content")
        return self

    @property
    def deduplicate(self) -> bool:
        return self.tagger if self.dedupe is None else self.dedupe

    def output_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OUTPUT_FIELDS}

    def parser(self) -> CaptionParser:
        return CaptionParser(self.policy, tagger=self.tagger, compounds=self.compounds, noun_pairs=self.noun_pairs,
                             batch_size=self.batch_size, cache_size=self.cache_size if self.deduplicate else 0)


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


def parse_shard(corpus: Corpus, shard: ShardRef, parser: CaptionParser, config: ParseConfig) -> ShardResult:
    """Read one shard's captions and turn them into the three tables; never raises for a bad sample."""
    with _gc_paused():
        return _parse_shard(corpus, shard, parser, config)


def _parse_shard(corpus: Corpus, shard: ShardRef, parser: CaptionParser, config: ParseConfig) -> ShardResult:
    stats = ShardStats()
    errors: list[dict[str, Any]] = []
    keys: list[str] = []
    cleans: list[CleanCaption] = []
    caption_rows: list[dict[str, Any]] = []
    for item in corpus.read_captions(shard, stats):
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
                 model_id: str) -> None:
    store.commit(STAGE, shard.partition, fp, result.tables, stage_version=STAGE_VERSION,
                 config={**config.output_config(), "stats": result.as_dict()}, model_id=model_id,
                 input_fingerprint=shard.fingerprint)


# ---------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _init_worker(config: dict[str, Any], corpus_uri: str, fmt: str, name: str, store_uri: str,
                 model_id: str) -> None:
    cfg = ParseConfig(**config)
    _WORKER.update(config=cfg, parser=cfg.parser(), corpus=open_corpus(corpus_uri, fmt=fmt, name=name),
                   store=Store(store_uri), model_id=model_id)


def _process(corpus: Corpus, store: Store, shard: ShardRef, fp: str, parser: CaptionParser, config: ParseConfig,
             model_id: str) -> dict[str, Any]:
    """Parse and commit one shard, unless another run holds it or finished it since planning."""
    with claim(store, STAGE, shard.partition) as holder:
        if holder is not None:
            return {"skipped": "claimed", "holder": holder}
        if store.is_done(STAGE, shard.partition, fp):
            return {"skipped": "done"}
        result = parse_shard(corpus, shard, parser, config)
        commit_shard(store, shard, fp, result, config, model_id)
        return result.as_dict()


def _work(shard: ShardRef, fp: str) -> dict[str, Any]:
    w = _WORKER
    return _process(w["corpus"], w["store"], shard, fp, w["parser"], w["config"], w["model_id"])


def _process_context() -> multiprocessing.context.BaseContext:
    """Not fork: the parent may hold threads (s3fs's event loop, Arrow's pools) that a fork would copy broken.
    A fork server that has imported spaCy once (about 4 s here: thinc imports torch) forks clean workers at no
    import cost; spawn, where there is no fork server, pays the import in every worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ttd.tags", "spacy"])  # only effective before the fork server first starts
    return ctx


Outcome = Callable[[ShardRef, "dict[str, Any] | BaseException"], None]


def _run_pool(todo: list[tuple[ShardRef, str]], corpus: Corpus, store_uri: str, config: ParseConfig,
              model_id: str, outcome: Outcome, on_start: Callable[[int], None]) -> None:
    init = (config.model_dump(), corpus.uri, corpus.format, corpus.name, store_uri, model_id)
    with ProcessPoolExecutor(min(config.workers, len(todo)), mp_context=_process_context(),
                             initializer=_init_worker, initargs=init) as pool:
        on_start(len(todo))
        pending = {pool.submit(_work, shard, fp): shard for shard, fp in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    shard = pending.pop(fut)
                    exc = fut.exception()
                    if isinstance(exc, (BrokenProcessPool, TTDError)):  # not one shard's problem: stop, one line
                        raise exc
                    outcome(shard, exc if exc is not None else fut.result())
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise TTDError("a parse worker process died (out of memory, or killed); shards committed so far are "
                           "kept, re-run to finish. Calling run_parse(workers > 1) from a script needs the "
                           "`if __name__ == '__main__':` guard") from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _run_here(todo: list[tuple[ShardRef, str]], corpus: Corpus, store: Store, config: ParseConfig, model_id: str,
              outcome: Outcome, on_start: Callable[[int], None]) -> None:
    parser = config.parser()
    on_start(len(todo))  # after the parser has loaded: the rate a user sees is parsing's
    for shard, fp in todo:
        try:
            counts: dict[str, Any] | BaseException = _process(corpus, store, shard, fp, parser, config, model_id)
        except TTDError:
            raise  # a setup problem (schema version, store), the same for every shard: one clear line
        except Exception as exc:
            counts = exc
        outcome(shard, counts)


# ---------------------------------------------------------------- the stage

def _ignore(_: int) -> None:
    pass


_SUMMED = ("samples", "captions", "parsed", "tags", "errors", "warnings", "empty", "truncated", "normalised",
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
    progress: Callable[[ShardRef, dict[str, Any] | None], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Parse every shard not yet done under this config; returns a summary of what was done and skipped.
    `shards` limits the run to those shard names (a batch of the Prefect flow); the others are not counted.

    `progress(shard, counts)` is called once per shard: counts is None for a skipped, waiting or failed shard;
    `on_start(n)` once the parser is loaded and n shards are to be parsed.
    A shard that fails as a whole (an unreadable file, a failed write) is listed in `failed` and left uncommitted
    for the next run; the other shards go on."""
    t0 = time.perf_counter()
    config = config or ParseConfig()
    corpus = open_corpus(corpus_uri, fmt=fmt, name=name)
    store = Store(store_uri, create=True)
    store.register_corpus(corpus.name, corpus.uri, corpus.format)
    model_id = english_model_id()
    summary: dict[str, Any] = {"corpus": corpus.name, "format": corpus.format, **config.output_config(),
                               "model_id": model_id, "workers": config.workers, "shards": 0, "done": 0,
                               "skipped_done": 0, "claimed_elsewhere": [], "waiting": [], "failed": [],
                               **dict.fromkeys(_SUMMED, 0)}
    todo = _plan(corpus, store, config, model_id, include_incomplete, summary, progress, shards)

    def outcome(shard: ShardRef, counts: dict[str, Any] | BaseException) -> None:
        if isinstance(counts, BaseException):
            log.error("shard %s/%s failed, left for the next run: %s: %s", corpus.name, shard.name,
                      type(counts).__name__, counts)
            summary["failed"].append({"shard": shard.name, "error": f"{type(counts).__name__}: {counts}"[:500]})
            counts = None
        elif counts.get("skipped") == "done":  # another run committed it after this one planned
            summary["skipped_done"] += 1
            counts = None
        elif counts.get("skipped") == "claimed":
            holder = counts["holder"]
            log.warning("shard %s/%s is being worked on by another run (%s, pid %s): skipped", corpus.name,
                        shard.name, holder.get("machine", "?"), holder.get("pid", "?"))
            summary["claimed_elsewhere"].append(shard.name)
            counts = None
        else:
            summary["done"] += 1
            for k in _SUMMED:
                summary[k] += counts.get(k, 0)
        if progress:
            progress(shard, counts)

    if todo and config.workers > 1 and len(todo) > 1:
        _run_pool(todo, corpus, store_uri, config, model_id, outcome, on_start or _ignore)
    elif todo:
        _run_here(todo, corpus, store, config, model_id, outcome, on_start or _ignore)
    elif on_start:
        on_start(0)
    clear_stale(store, STAGE)  # a run killed between commit and release left its claim on a done shard
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["captions_per_s"] = round(summary["captions"] / summary["seconds"], 1) if summary["seconds"] else 0.0
    log.info("parse %s: %d shard(s) committed, %d already done, %d waiting; %d captions, %d error row(s), "
             "%.1f captions/s", corpus.name, summary["done"], summary["skipped_done"], len(summary["waiting"]),
             summary["captions"], summary["errors"], summary["captions_per_s"])
    return summary


class PlannedShard(NamedTuple):
    """One shard as planning sees it: its parse fingerprint (None while it waits for img2dataset's _stats.json) and
    whether the store already holds its output under that fingerprint."""

    shard: ShardRef
    fingerprint: str | None
    done: bool


def plan_shards(corpus: Corpus, store: Store, config: ParseConfig, model_id: str | None = None,
                include_incomplete: bool = False) -> list[PlannedShard]:
    """Every shard of the corpus, in order, with its fingerprint and done state; reads manifests, never data."""
    model_id = model_id or english_model_id()
    fp_config = {**config.output_config(), "compound_list": compounds_digest() if config.compounds else None}
    planned = []
    for shard in corpus.shards():
        if not shard.complete and not include_incomplete:
            planned.append(PlannedShard(shard, None, False))
            continue
        fp = fingerprint(STAGE, STAGE_VERSION, fp_config, model_id, shard.fingerprint)
        planned.append(PlannedShard(shard, fp, store.is_done(STAGE, shard.partition, fp)))
    return planned


def _plan(corpus: Corpus, store: Store, config: ParseConfig, model_id: str, include_incomplete: bool,
          summary: dict[str, Any], progress: Callable | None,
          shards: Collection[str] | None = None) -> list[tuple[ShardRef, str]]:
    """The shards to parse, with their fingerprints; done and waiting shards are counted in `summary`."""
    planned = select_planned(plan_shards(corpus, store, config, model_id, include_incomplete), shards, corpus.name)
    todo = []
    for p in planned:
        summary["shards"] += 1
        if p.fingerprint is None:
            log.warning("shard %s/%s has no _stats.json yet (still downloading?): left for a later run",
                        corpus.name, p.shard.name)
            summary["waiting"].append(p.shard.name)
        elif not p.done:
            todo.append((p.shard, p.fingerprint))
            continue
        else:
            summary["skipped_done"] += 1
        if progress:
            progress(p.shard, None)
    return todo
