"""Stage `index`: register a corpus in a store and check every shard, recording each bad sample in `errors`.

Reads every sample of every finished shard (decoding images when asked), writes the shard's read problems to
`errors` and commits the shard with its counts in the manifest. Shards without img2dataset's `_stats.json` are
still being written by the downloader: they are reported as waiting and picked up by a later run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from . import schemas
from .corpus import ReadIssue, Sample, ShardRef, ShardStats, open_corpus
from .errors import ImageDecodeError
from .store import Store, fingerprint

log = logging.getLogger(__name__)

STAGE = "index"
STAGE_VERSION = 1


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = schemas.get("errors").arrow
    return pa.Table.from_pylist(rows, schema=schema)


def index_shard(corpus, shard: ShardRef, *, decode: bool) -> tuple[list[dict], ShardStats]:
    stats = ShardStats()
    rows = []
    for item in corpus.read_shard(shard, stats):
        if isinstance(item, ReadIssue):
            rows.append(item.as_row())
        elif decode and isinstance(item, Sample):
            try:
                item.image()
            except ImageDecodeError as exc:
                stats.errors += 1
                rows.append(ReadIssue(corpus.name, shard.name, item.key, exc.error_type, str(exc), "error",
                                      item.source).as_row())
    return rows, stats


def run_index(
    corpus_uri: str,
    store_uri: str,
    *,
    fmt: str = "auto",
    name: str | None = None,
    decode: bool = True,
    include_incomplete: bool = False,
    progress: Callable[[ShardRef, ShardStats | None], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Index every shard not yet done under this config; returns a summary of what was done and skipped.
    `on_start(n)` once planned (n shards to index), `progress(shard, stats)` after each."""
    t0 = time.perf_counter()
    corpus = open_corpus(corpus_uri, fmt=fmt, name=name)
    store = Store(store_uri, create=True)
    store.register_corpus(corpus.name, corpus.uri, corpus.format)
    config = {"decode": decode, "format": corpus.format}
    summary: dict[str, Any] = {"corpus": corpus.name, "format": corpus.format, "shards": 0, "done": 0,
                               "skipped_done": 0, "waiting": [], "samples": 0, "errors": 0, "warnings": 0,
                               "skipped_status": {}}
    todo = []
    for shard in corpus.shards():  # planning reads manifests only
        summary["shards"] += 1
        if not shard.complete and not include_incomplete:
            log.warning("shard %s/%s has no _stats.json yet (still downloading?): left for a later run",
                        corpus.name, shard.name)
            summary["waiting"].append(shard.name)
            continue
        fp = fingerprint(STAGE, STAGE_VERSION, config, shard.fingerprint)
        if store.is_done(STAGE, shard.partition, fp):
            summary["skipped_done"] += 1
            continue
        todo.append((shard, fp))
    if on_start:
        on_start(len(todo))
    for shard, fp in todo:
        rows, stats = index_shard(corpus, shard, decode=decode)
        store.commit(STAGE, shard.partition, fp, {"errors": errors_table(rows)}, stage_version=STAGE_VERSION,
                     config={**config, "stats": stats.as_dict()}, input_fingerprint=shard.fingerprint)
        summary["done"] += 1
        summary["samples"] += stats.samples
        summary["errors"] += stats.errors
        summary["warnings"] += stats.warnings
        for k, v in stats.skipped_status.items():
            summary["skipped_status"][k] = summary["skipped_status"].get(k, 0) + v
        if progress:
            progress(shard, stats)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
