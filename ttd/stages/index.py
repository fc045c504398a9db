"""Stage `index`: register a corpus in a store and check every shard, recording each bad sample in `errors`.

Reads every sample of every finished shard (decoding images when asked), writes the shard's read problems to
`errors` and commits the shard with its counts in the manifest. Shards without img2dataset's `_stats.json` are
still being written by the downloader: they are reported as waiting and picked up by a later run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from ttd.corpus import ReadIssue, Sample, ShardRef, ShardStats, open_corpus
from ttd.errors import ImageDecodeError
from ttd.stages import engine as stage
from ttd.stages.engine import Held, PlannedShard, SerialWorker, StageSpec, Summary, WorkerSpec
from ttd.store import schemas
from ttd.store.store import Store

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


class IndexWorker(SerialWorker):
    """Checks shards and commits each one's `errors` rows, its counts in the manifest."""

    def __init__(self, corpus: dict[str, str], store_uri: str, decode: bool, config: dict[str, Any]):
        super().__init__()
        self.corpus = open_corpus(corpus["uri"], fmt=corpus["format"], name=corpus["name"])
        self.store, self.decode, self.config = Store(store_uri), decode, config

    def process_one(self, job: PlannedShard) -> dict[str, Any]:
        def work(held: Held) -> dict[str, Any]:
            rows, stats = index_shard(self.corpus, job.shard, decode=self.decode)
            self.store.commit(STAGE, job.shard.partition, job.fingerprint, {"errors": errors_table(rows)},
                              stage_version=STAGE_VERSION, config={**self.config, "stats": stats.as_dict()},
                              input_fingerprint=job.input_fingerprint, fresh=held.fresh)
            return stats.as_dict()

        return stage.run_claimed(self.store, STAGE, job, work)


def run_index(
    corpus_uri: str,
    store_uri: str,
    *,
    fmt: str = "auto",
    name: str | None = None,
    decode: bool = True,
    include_incomplete: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Index every shard not yet done under this config; returns a summary of what was done and skipped.
    `on_start(n)` once planned (n shards to index), `progress(result)` after each."""
    corpus = open_corpus(corpus_uri, fmt=fmt, name=name)
    store = Store(store_uri, create=True)
    store.register_corpus(corpus.name, corpus.uri, corpus.format)
    config = {"decode": decode, "format": corpus.format}
    summary = Summary(STAGE, corpus.name, ("samples", "errors", "warnings", "skipped_status"),
                      extra={"format": corpus.format}, progress=progress)
    todo = summary.planned(stage.plan(corpus, store, StageSpec(STAGE, STAGE_VERSION, config),
                                include_incomplete=include_incomplete))
    if todo:
        spec = WorkerSpec(IndexWorker, ({"uri": corpus.uri, "format": corpus.format, "name": corpus.name},
                                        store_uri, decode, config))
        stage.run_here(spec, todo, summary.account, on_start)
    elif on_start:
        on_start(0)
    stage.finish_run(store, STAGE, corpus.name, summary.counts["done"])
    return summary.as_dict()
