"""The pipeline's store: hive-partitioned Parquet tables under one fsspec root, committed per shard by manifests.

Layout under the root URI::

    _ttd_store.json                                   store format version
    corpora/NAME.json                                 corpora the stages have read (name, uri, format)
    tables/TABLE/corpus=C/shard=S/STAGE-FP.parquet    data files (FP = the stage fingerprint)
    manifests/STAGE/corpus=C/shard=S.json             the commit record of one stage on one shard
    _staging/STAGE/corpus=C/shard=S/RUN/TABLE.parquet  data files of a shard being committed (never read)

Commit protocol: a shard's data files are written under `_staging/` first, moved into `tables/` (a local rename,
or a server-side copy), then its manifest is written, last, in one atomic step (a rename, or one S3 PUT). So a
shard killed mid-way leaves nothing in `tables/` that a plain reader of the folders (DuckDB, Polars, Spark) would
count, and ttd's readers only ever see files that a manifest names. A kill between the move and the manifest (a
moment) leaves a file in `tables/` that no manifest names: the shard is redone by the next run, whose commit
removes every file of its stage in the shard's folders that the new manifest does not name; staged leftovers are
removed at the end of the next run (`claims.clear_leftovers`). A re-run whose fingerprint equals the manifest's
is skipped; a new fingerprint (changed config, model or input) replaces the shard's files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ttd import __version__
from ttd.errors import SchemaError, TTDError
from ttd.store import schemas
from ttd.store.uri import Location, check_reachable, resolve

log = logging.getLogger(__name__)

STORE_FORMAT = "ttd-store"
STORE_VERSION = 1
MARKER = "_ttd_store.json"
INDEX_DIR = "_index"  # manifests/_index/STAGE.parquet: every manifest of a stage in one object (reads saved)
INDEX_REWRITE_AFTER = 64  # manifests read one by one before a stage's planning rewrites its index
STAGING = "_staging"  # data files of shards not yet committed; outside tables/, and `_` hides it from hive readers
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(value: str, what: str) -> str:
    """Partition values end up in paths: keep them to a safe alphabet."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise TTDError(f"invalid {what} name {value!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return value


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stamp(info: Mapping[str, Any]) -> str:
    """What changes when a listed file is rewritten: its ETag on object stores; locally its modification time,
    inode (an atomic rewrite is a new file) and size."""
    etag = info.get("ETag") or info.get("etag")
    return str(etag) if etag else f"{info.get('mtime')}:{info.get('ino')}:{info.get('size')}"


def partition_path(partition: Mapping[str, str]) -> str:
    return "/".join(f"{k}={check_name(v, k)}" for k, v in partition.items())


class Store:
    """A store at a local path or any fsspec URI (``s3://bucket/prefix``)."""

    def __init__(self, uri: str, *, create: bool = False):
        self.uri = uri
        self.root: Location = resolve(uri, what="store")
        check_reachable(self.root, "store")
        fs = self.root.fs
        marker = self.root.join(MARKER)
        try:  # one request: a missing marker is a missing object (exists, then a read, cost three on S3)
            data = self.read_bytes(marker)
        except (FileNotFoundError, NotADirectoryError):  # no store here yet (or a file where it should be)
            data = None
        except OSError as exc:
            raise SchemaError(f"store {uri!r}: unreadable {MARKER}: {exc}") from None
        if data is not None:
            self._check_marker(data)
        elif create:
            if fs.exists(self.root.path) and fs.isfile(self.root.path):
                raise TTDError(f"store {uri!r} is a file: give a directory or URL prefix")
            fs.makedirs(self.root.path, exist_ok=True)
            self._atomic_write(marker, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}).encode())
        elif fs.exists(self.root.path):
            raise TTDError(f"{uri!r} is not a ttd store (no {MARKER}): give the --store a stage wrote to")
        else:
            raise TTDError(f"store {uri!r} does not exist: run a stage with --store {uri} first")

    def _check_marker(self, data: bytes) -> None:
        try:
            info = json.loads(data)
        except ValueError as exc:
            raise SchemaError(f"store {self.uri!r}: unreadable {MARKER}: {exc}") from None
        if info.get("format") != STORE_FORMAT or info.get("version") != STORE_VERSION:
            raise SchemaError(
                f"store {self.uri!r} has format {info.get('format')!r} version {info.get('version')!r}; this ttd "
                f"reads {STORE_FORMAT!r} version {STORE_VERSION}: use the matching ttd release or a new store"
            )

    # ---- low-level writes -------------------------------------------------------------------------------------
    def _atomic_write(self, path: str, data: bytes) -> None:
        """Local: write a temporary sibling, then rename. Object stores: one PUT is already atomic."""
        fs = self.root.fs
        if self.root.protocol == "file":
            parent = path.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            with fs.open(path, "wb") as f:
                f.write(data)

    def _write_parquet(self, path: str, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._atomic_write(path, sink.getvalue().to_pybytes())
        return path

    def publish_parquet(self, path: str, table: pa.Table, staging: str) -> None:
        """Write a Parquet file that readers of the folders must see whole or not at all: staged under `_staging/`
        (`staging` names the writer, e.g. "compact"), then moved to `path`."""
        name = f"{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        self._move(self._write_parquet(self.root.join(STAGING, check_name(staging, "stage"), name), table), path)

    def write_json(self, path: str, doc: Any) -> None:
        """A JSON document written in one atomic step (a rename, or one PUT)."""
        self._atomic_write(path, json.dumps(doc, sort_keys=True).encode())

    def read_bytes(self, path: str) -> bytes:
        """A small object's bytes in one request: s3fs otherwise asks for the size first (a HEAD, and a listing
        when the object is missing) to split large reads."""
        if self.root.protocol == "s3":
            return self.root.fs.cat_file(path, max_concurrency=1)
        return self.root.fs.cat_file(path)

    def _move(self, src: str, dst: str) -> None:
        """Into place: a rename on local disk; on an object store a server-side copy, then the source deleted."""
        self._move_all([(src, dst)])

    def _move_all(self, moves: list[tuple[str, str]]) -> None:
        """Several files into place. On S3 a copy request each (s3fs's `cp_file` would first HEAD the source for
        its size; ours are far below the 5 GB single-copy limit) and one bulk delete of the sources."""
        fs = self.root.fs
        if self.root.protocol == "file":
            for src, dst in moves:
                fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                fs.mv(src, dst)
            return
        for src, dst in moves:
            if self.root.protocol == "s3":
                bucket, key, _ = fs.split_path(src)
                dst_bucket, dst_key, _ = fs.split_path(dst)
                fs.call_s3("copy_object", Bucket=dst_bucket, Key=dst_key, CopySource={"Bucket": bucket, "Key": key})
                fs.invalidate_cache(dst)
            else:  # one file each way: fsspec's `mv` first expands and checks both paths (a listing or two each)
                fs.cp_file(src, dst)
        fs.rm([src for src, _ in moves])

    def _remove_orphans(self, stage: str, part: str, files: Mapping[str, list[str]]) -> None:
        """Files of `stage` in the partition's folders that the new manifest does not name: the previous commit's
        files under another fingerprint, and any a killed run moved into place but never committed."""
        fs = self.root.fs
        keep = {self.root.join(f) for fl in files.values() for f in fl}
        for name in files:
            folder = self.root.join("tables", name, part)
            fs.invalidate_cache(folder)
            try:
                present = fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            self.remove(p for p in present if p.rsplit("/", 1)[-1].startswith(f"{stage}-") and p not in keep)

    def remove(self, paths: Iterable[str]) -> int:
        """Delete these files, those already gone (another run's cleanup) included; returns how many this did."""
        removed = 0
        for path in paths:
            try:
                self.root.fs.rm_file(path)
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def find(self, base: str, *, withdirs: bool = False) -> dict[str, dict]:
        """Every file under the folder `base` (and its folders, with `withdirs`), path -> details, from one
        listing, fresh; empty when there are none. On S3 a listing that finds nothing is one request, not three
        (s3fs's `find` then asks whether `base` is a file: a HEAD and another listing), which every run pays for
        its claims and staging folders, empty when no run was killed."""
        fs = self.root.fs
        fs.invalidate_cache(base)
        if self.root.protocol == "s3":
            parent, name = base.rsplit("/", 1)
            found = fs.find(parent, prefix=f"{name}/", withdirs=withdirs, detail=True)
            return {p: info for p, info in found.items() if p.startswith(f"{base}/")}
        try:
            return fs.find(base, withdirs=withdirs, detail=True)
        except FileNotFoundError:
            return {}

    def _remove_empty(self, folder: str, levels: int = 2) -> None:
        """A local staging folder (RUN) and its partition's last folder (shard=S) when empty: only folders the
        shard's claim holder owns. Shared parents (corpus=C) stay, or another process's `makedirs` would race."""
        for _ in range(levels):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = folder.rsplit("/", 1)[0]

    def clear_staging(self, stage: str, in_progress: Callable[[str], bool]) -> int:
        """Remove what killed runs left in `_staging/STAGE/` (files written, never moved into place), except for
        partitions `in_progress(partition_path)` says another run is working on. One listing; returns the files
        removed. Staged files are invisible to every reader; this only frees their space."""
        base = self.root.join(STAGING, check_name(stage, "stage"))
        found = self.find(base, withdirs=True)
        # corpus=C/shard=S is the path before RUN/TABLE.parquet
        removed = self.remove(p for p, info in found.items()
                              if info["type"] != "directory" and not in_progress(p[len(base) + 1:].rsplit("/", 2)[0]))
        if self.root.protocol == "file":  # RUN folders emptied here, or by killed runs that moved their files
            for path, info in found.items():
                rel = path[len(base) + 1:]
                if info["type"] == "directory" and rel.count("/") >= 2 and not in_progress(rel.rsplit("/", 1)[0]):
                    self._remove_empty(path)
        return removed

    # ---- manifests ----------------------------------------------------------------------------------------------
    def _manifest_path(self, stage: str, partition: Mapping[str, str]) -> str:
        return self.root.join("manifests", check_name(stage, "stage"), partition_path(partition) + ".json")

    def manifest(self, stage: str, partition: Mapping[str, str]) -> dict | None:
        path = self._manifest_path(stage, partition)
        try:
            data = self.read_bytes(path)
        except FileNotFoundError:
            return None
        return self._parse_manifest(data, path)

    def _parse_manifest(self, data: bytes, path: str) -> dict:
        try:
            doc = json.loads(data)
        except ValueError:
            raise SchemaError(f"manifest {path} is not valid JSON: delete it to redo that shard") from None
        for table, version in doc.get("schema_versions", {}).items():
            schemas.check_version(table, version, f"manifest {path}")
        return doc

    def is_done(self, stage: str, partition: Mapping[str, str], fp: str) -> bool:
        doc = self.manifest(stage, partition)
        return doc is not None and doc.get("fingerprint") == fp

    def committed(self, stage: str, corpus: str) -> dict[str, dict]:
        """shard name -> manifest, for every shard of `corpus` that `stage` has committed: one listing of the
        stage's manifests, then the stage's manifest index and only the manifests it does not hold (read in
        parallel); the index is brought up to date when many were missing."""
        docs = self.manifests(stage, prefix=f"corpus={check_name(corpus, 'corpus')}", update_index=True)
        return {d["shard"]: d for d in docs if "shard" in d}

    def manifests(self, stage: str | None = None, prefix: str | None = None, *,
                  update_index: bool = False) -> list[dict]:
        """Every committed manifest (of one stage, or all; under `prefix` of the stage's folder, e.g. one
        corpus's), sorted by stage and partition. One listing says which manifests exist and their ETag or
        modification stamp; a manifest whose stamp the stage's index (`manifests/_index/STAGE.parquet`) holds is
        taken from it, the others are read in parallel (fsspec's bulk `cat`). `update_index`: rewrite the index
        when INDEX_REWRITE_AFTER or more were read (a stage's planning does; readers such as `ttd sql` never
        write). The index only saves reads: an entry is used only while its manifest's stamp is unchanged."""
        fs = self.root.fs
        root = self.root.join("manifests")
        base = self.root.join("manifests", *(p for p in (stage, prefix) if p))
        fs.invalidate_cache()
        found = self.find(base)
        # manifests/_index and manifests/_compact hold ttd's own bookkeeping, not stage manifests
        listed = {p: _stamp(info) for p, info in found.items()
                  if p.endswith(".json") and "/.tmp-" not in p and info.get("type") != "directory"
                  and not p[len(root) + 1:].startswith("_")}
        if not listed:
            return []
        stages = [stage] if stage else sorted({p[len(root) + 1:].split("/", 1)[0] for p in listed})
        indexed = {st: self._read_index(st) for st in stages}
        docs, fetch = {}, []
        for path, stamp in listed.items():
            rel = path[len(root) + 1:]
            entry = indexed[rel.split("/", 1)[0]].get(rel)
            if entry is not None and entry[0] == stamp:
                docs[path] = self._parse_manifest(entry[1], path)
            else:
                fetch.append(path)
        if fetch:
            for path, data in fs.cat(fetch).items():
                docs[path] = self._parse_manifest(data, path)
        if update_index and stage and len(fetch) >= INDEX_REWRITE_AFTER:
            self._write_index(stage, indexed[stage], {p[len(root) + 1:]: (listed[p], docs[p]) for p in listed})
        return [docs[p] for p in sorted(docs)]

    def _index_path(self, stage: str) -> str:
        return self.root.join("manifests", INDEX_DIR, f"{check_name(stage, 'stage')}.parquet")

    def _read_index(self, stage: str) -> dict[str, tuple[str, bytes]]:
        """rel path -> (stamp, manifest JSON) of the stage's index; empty when there is none or it is unreadable
        (the index only saves reads)."""
        try:
            table = pq.read_table(pa.BufferReader(self.read_bytes(self._index_path(stage))))
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - a torn or foreign index: read the manifests themselves
            log.warning("manifest index of stage %s unreadable (%s): reading the manifests", stage, exc)
            return {}
        cols = table.to_pydict()
        return {p: (st, d.encode()) for p, st, d in zip(cols["path"], cols["stamp"], cols["doc"])}

    def _write_index(self, stage: str, old: dict[str, tuple[str, bytes]], fresh: dict[str, tuple[str, dict]]
                     ) -> None:
        """The stage's index: the entries just listed and read, and those of the old index outside that listing
        (other corpora's; a stale one is never used, its stamp no longer matching)."""
        entries = {p: (st, d.decode()) for p, (st, d) in old.items() if p not in fresh}
        entries.update({p: (st, json.dumps(doc, sort_keys=True)) for p, (st, doc) in fresh.items()})
        paths = sorted(entries)
        table = pa.table({"path": paths, "stamp": [entries[p][0] for p in paths],
                          "doc": [entries[p][1] for p in paths]})
        try:
            self._write_parquet(self._index_path(stage), table)
        except Exception as exc:  # noqa: BLE001 - a read-only store or a failed write: the manifests stay the truth
            log.warning("could not write the manifest index of stage %s: %s", stage, exc)

    def commit(
        self,
        stage: str,
        partition: Mapping[str, str],
        fp: str,
        tables: Mapping[str, pa.Table],
        *,
        stage_version: int = 1,
        config: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        input_fingerprint: str = "",
        fresh: bool = False,
    ) -> dict:
        """Write one stage's output for one partition (normally corpus + shard) and commit it by its manifest.

        `fresh`: the caller holds the partition's claim, created (not taken over from a killed run) when the
        partition had no manifest, so no earlier file of this stage can lie in its folders (a failed commit removes
        what it moved): the listing that looks for orphans is skipped (on S3, a request per table)."""
        partition = dict(partition)
        part = partition_path(partition)
        files: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        versions: dict[str, int] = {}
        staging = self.root.join(STAGING, stage, part, uuid.uuid4().hex)
        staged = []
        for name, table in tables.items():
            schema = schemas.get(name)
            if tuple(partition) != schema.partitioning:
                raise SchemaError(f"table {name!r} is partitioned by {schema.partitioning}, got {tuple(partition)}")
            table = schema.conform(table)
            rel = f"tables/{name}/{part}/{stage}-{fp}.parquet"
            # written outside tables/ first: a reader of the folders never sees a shard that is not committed
            staged.append((self._write_parquet(f"{staging}/{name}.parquet", table), self.root.join(rel)))
            files[name], rows[name], versions[name] = [rel], table.num_rows, schema.version
        doc = {
            "stage": stage,
            "stage_version": stage_version,
            **partition,
            "fingerprint": fp,
            "input_fingerprint": input_fingerprint,
            "config": dict(config or {}),
            "model_id": model_id,
            "files": files,
            "rows": rows,
            "schema_versions": versions,
            "ttd_version": __version__,
            "committed_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds"),
        }
        try:
            self._move_all(staged)
            if self.root.protocol == "file":  # object stores have no empty folders to leave behind
                self._remove_empty(staging)
            self._atomic_write(self._manifest_path(stage, partition),
                               json.dumps(doc, indent=1, sort_keys=True).encode())
        except BaseException:
            self._undo_moves(stage, partition, [final for _, final in staged])
            raise
        if not fresh:
            self._remove_orphans(stage, part, files)
        log.debug("committed %s %s (%s)", stage, part, rows)
        return doc

    def _undo_moves(self, stage: str, partition: Mapping[str, str], moved: list[str]) -> None:
        """A commit failed after moving files into place: remove those its partition's manifest does not name
        (outside readers would count them, and a later `fresh` commit would not look for them). Best effort."""
        try:
            current = self.manifest(stage, partition) or {}
            named = {self.root.join(f) for fl in current.get("files", {}).values() for f in fl}
            self.remove(p for p in moved if p not in named)
        except Exception as exc:  # noqa: BLE001 - the next commit that is not `fresh` lists and removes them
            log.warning("could not remove the files of a failed %s commit: %s", stage, exc)

    # ---- reads ----------------------------------------------------------------------------------------------------
    def files(self, table: str, manifests: Iterable[dict] | None = None) -> list[str]:
        """Absolute paths (in the store's filesystem) of every committed data file of `table`."""
        schemas.get(table)
        docs = self.manifests() if manifests is None else manifests
        return sorted({self.root.join(f) for m in docs for f in m.get("files", {}).get(table, [])})

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset over the committed files, hive partition columns included; filters push down."""
        schema = schemas.get(table)
        part_fields = [pa.field(p, pa.string()) for p in schema.partitioning]
        full = pa.schema(list(schema.arrow) + part_fields)
        paths = self.files(table)
        if not paths:
            return ds.dataset(full.empty_table())
        return ds.dataset(
            paths,
            schema=full,
            format="parquet",
            filesystem=self.root.fs,
            partitioning=ds.partitioning(pa.schema(part_fields), flavor="hive"),
            partition_base_dir=self.root.join("tables", table),
        )

    def read(self, table: str, *, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        return self.dataset(table).to_table(columns=columns, filter=filter)

    # ---- corpora --------------------------------------------------------------------------------------------------
    def register_corpus(self, name: str, uri: str, fmt: str) -> None:
        """Remember which corpus a name stands for (`ttd sql` exposes its metadata as `samples`). A name stands for
        one corpus: another URI under a name already taken is refused, since its shards would land in the same
        partitions and replace the first corpus's rows."""
        doc = {"name": check_name(name, "corpus"), "uri": uri, "format": fmt}
        known = self.corpus(name)
        if known == doc:
            return
        _refuse_another_corpus(name, known, uri)
        path = self.root.join("corpora", f"{name}.json")
        self._atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def corpus(self, name: str) -> dict | None:
        """The registration of the corpus named `name` ({name, uri, format}), or None."""
        try:
            return json.loads(self.read_bytes(self.root.join("corpora", f"{name}.json")))
        except (FileNotFoundError, ValueError):
            return None

    def check_corpus(self, name: str, uri: str) -> None:
        """Refuse a corpus whose name this store already gives to another URI."""
        _refuse_another_corpus(name, self.corpus(name), uri)

    def corpora(self) -> dict[str, dict]:
        fs = self.root.fs
        fs.invalidate_cache()
        try:
            paths = [p for p in fs.ls(self.root.join("corpora"), detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        docs = [json.loads(fs.cat_file(p)) for p in sorted(paths)]
        return {d["name"]: d for d in docs}


def _refuse_another_corpus(name: str, known: dict | None, uri: str) -> None:
    if known is not None and known["uri"] != uri:
        raise TTDError(f"the store already holds a corpus named {name!r}, from {known['uri']}; {uri} is another "
                       "corpus: give it its own name (--corpus-name), or use another store")
