"""`ttd compact`: read-optimised copies of a store's per-shard tables, for `ttd sql` over thousands of shards.

A store of 10,000 shards holds 10,000 small Parquet files per table, and DuckDB's cost is per file: a cold
group-by over 10 million tag rows in 10,000 shards took 3.0 s, 1.65 s once compacted (docs/BENCHMARKS.md, "Corpus
scale"). Compaction writes the committed rows of many shards into large part files:

    compact/TABLE/corpus=C/part-ID.parquet       rows of many shards, `corpus` and `shard` as columns
    manifests/_compact/TABLE/corpus=C.json       {"parts": [{"file", "rows", "members": [[shard, stage, fp]]}]}

The per-shard files stay where they are, the truth for the stages, `Store.read` and readers outside ttd; a part
is a cache of them. A part is used only while every member (shard, stage) still has the manifest fingerprint it
was made from: a shard re-committed since (new config, model or input) is read from its own files, and its part
is rewritten by the next compaction. The compaction manifest is written last and atomically, after its parts.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from ttd.store import schemas
from ttd.store.store import STAGING, Store, check_name

log = logging.getLogger(__name__)

COMPACT_DIR = "compact"
SHARD_TABLES = tuple(t for t in schemas.parquet_tables() if schemas.get(t).partitioning == ("corpus", "shard"))
Member = tuple[str, str, str]  # (shard, stage, fingerprint)


@dataclass
class TableState:
    """One table of one corpus: the committed (shard, stage) members with their fingerprint and files, and the
    parts of the last compaction that are still valid."""

    table: str
    corpus: str
    members: dict[tuple[str, str], tuple[str, list[str], int]]  # (shard, stage) -> (fingerprint, files, rows)
    parts: list[dict[str, Any]]  # valid parts of the compaction manifest
    stale: list[dict[str, Any]]  # parts with a member re-committed or gone since

    @property
    def covered(self) -> set[tuple[str, str]]:
        return {(m[0], m[1]) for p in self.parts for m in p["members"]}

    def uncovered(self) -> list[tuple[str, str]]:
        return sorted(set(self.members) - self.covered)

    def uncovered_files(self) -> list[str]:
        return sorted({f for key in self.uncovered() for f in self.members[key][1]})


def compaction_path(store: Store, table: str, corpus: str) -> str:
    return store.root.join("manifests", "_compact", table, f"corpus={check_name(corpus, 'corpus')}.json")


def table_states(store: Store, manifests: list[dict] | None = None) -> list[TableState]:
    """Every (shard table, corpus) the store holds, with the parts of its compaction sorted into valid and
    stale against the committed manifests."""
    manifests = store.manifests() if manifests is None else manifests
    members: dict[tuple[str, str], dict] = defaultdict(dict)
    for m in manifests:
        for table, files in m.get("files", {}).items():
            if table in SHARD_TABLES and "shard" in m and "corpus" in m:
                members[(table, m["corpus"])][(m["shard"], m["stage"])] = (
                    m["fingerprint"], files, m.get("rows", {}).get(table, 0))
    states = []
    for (table, corpus), mem in sorted(members.items()):
        parts, stale = [], []
        for part in _read_doc(store, compaction_path(store, table, corpus)).get("parts", []):
            valid = all(mem.get((shard, stage), ("",))[0] == fp for shard, stage, fp in part["members"])
            (parts if valid else stale).append(part)
        states.append(TableState(table, corpus, mem, parts, stale))
    return states


def _read_doc(store: Store, path: str) -> dict[str, Any]:
    try:
        return json.loads(store.root.fs.cat_file(path))
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("compaction manifest %s is unreadable: its parts are ignored", path)
        return {}


def _groups(state: TableState, rows_per_file: int) -> list[list[tuple[str, str]]]:
    """Uncovered members in shard order, in groups of about `rows_per_file` rows."""
    groups: list[list[tuple[str, str]]] = []
    rows = 0
    for key in state.uncovered():
        if not groups or rows >= rows_per_file:
            groups.append([])
            rows = 0
        groups[-1].append(key)
        rows += state.members[key][2]
    return groups


def _write_part(store: Store, state: TableState, group: list[tuple[str, str]]) -> dict[str, Any]:
    schema = schemas.get(state.table)
    part_fields = [pa.field(p, pa.string()) for p in schema.partitioning]
    files = sorted({store.root.join(f) for key in group for f in state.members[key][1]})
    data = ds.dataset(files, schema=pa.schema(list(schema.arrow) + part_fields), format="parquet",
                      filesystem=store.root.fs, partitioning=ds.partitioning(pa.schema(part_fields), flavor="hive"),
                      partition_base_dir=store.root.join("tables", state.table)).to_table()
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    rel = f"{COMPACT_DIR}/{state.table}/corpus={state.corpus}/{name}"
    store.publish_parquet(store.root.join(rel), data, "compact")
    return {"file": rel, "rows": data.num_rows,
            "members": [[shard, stage, state.members[(shard, stage)][0]] for shard, stage in group]}


def compact(store_uri: str, *, rows_per_file: int = 1_000_000, min_rows: int = 0,
            progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Compact every shard table of the store: the committed rows not in a valid part go into new parts of about
    `rows_per_file` rows (a table with fewer than `min_rows` such rows is left as it is); stale parts are dropped.
    Idempotent: a second run with nothing re-committed writes nothing."""
    t0 = time.perf_counter()
    store = Store(store_uri)
    leftovers = store.root.join(STAGING, "compact")  # parts a killed compaction staged (one compaction at a time)
    try:
        store.remove(store.root.fs.find(leftovers))
    except FileNotFoundError:
        pass
    summary: dict[str, Any] = {"tables": [], "parts_written": 0, "rows_written": 0, "parts_dropped": 0}
    for state in table_states(store):
        todo = state.uncovered()
        rows = sum(state.members[key][2] for key in todo)
        entry = {"table": state.table, "corpus": state.corpus, "members": len(state.members),
                 "already_compacted": len(state.covered), "compacted_now": 0, "parts": len(state.parts)}
        if (todo and rows >= min_rows) or state.stale:
            new = [_write_part(store, state, group) for group in _groups(state, rows_per_file)] \
                if todo and rows >= min_rows else []
            doc = {"table": state.table, "corpus": state.corpus, "parts": state.parts + new}
            store.write_json(compaction_path(store, state.table, state.corpus), doc)
            store.remove(store.root.join(p["file"]) for p in state.stale)
            entry.update(compacted_now=sum(len(p["members"]) for p in new), parts=len(doc["parts"]))
            summary["parts_written"] += len(new)
            summary["rows_written"] += sum(p["rows"] for p in new)
            summary["parts_dropped"] += len(state.stale)
            if progress:
                progress(state.table, len(new))
        summary["tables"].append(entry)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
