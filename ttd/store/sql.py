"""Read-only DuckDB over a store: one view per table, `manifests`, and `samples` over the corpus metadata.

Safety: only SELECT/EXPLAIN statements run; external access is then switched off except for the store's and
the corpora's own folders (`allowed_directories`), and the configuration is locked, so `COPY … TO`, `ATTACH`,
`INSTALL` or `read_csv('/etc/passwd')` all fail.

S3: DuckDB's httpfs when it loads (it cannot be installed offline), else the store's fsspec filesystem is
registered with DuckDB. `TTD_SQL_S3=httpfs|fsspec|auto` forces one path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import duckdb
import pyarrow as pa

from ttd.corpus import open_corpus
from ttd.errors import TTDError, UnsafeQueryError
from ttd.store import schemas
from ttd.store.compact import SHARD_TABLES, table_states
from ttd.store.store import Store
from ttd.store.uri import Location

log = logging.getLogger(__name__)

ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _list(paths: Iterable[str]) -> str:
    return "[" + ", ".join(_quote(p) for p in paths) + "]"


def _single_pivot(sql: str) -> bool:
    """One PIVOT/UNPIVOT statement (DuckDB's tokenizer: comments skipped, no `;` before the last token)."""
    tokens = duckdb.tokenize(sql)
    if not tokens or sql[tokens[0][0]:].split(None, 1)[0].upper() not in ("PIVOT", "UNPIVOT"):
        return False
    return not any(sql[pos] == ";" for pos, kind in tokens[:-1] if kind == duckdb.token_type.operator)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise TTDError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    kinds = [st.type.name for st in statements]
    # DuckDB plans a PIVOT without an IN list as CREATE TYPE ... AS ENUM (its distinct values) then the SELECT:
    # an in-memory type of this throw-away connection, nothing written
    if kinds[-1:] == ["SELECT"] and set(kinds[:-1]) <= {"CREATE"} and _single_pivot(sql):
        return
    if len(statements) != 1:
        raise UnsafeQueryError(f"give exactly one SELECT statement (got {len(statements)})")
    kind = kinds[0]
    if kind not in ALLOWED_STATEMENTS:
        raise UnsafeQueryError(f"ttd sql is read-only: {kind} statements are refused; use SELECT")


def _s3_mode() -> str:
    mode = os.environ.get("TTD_SQL_S3", "auto").lower()
    if mode not in ("auto", "httpfs", "fsspec"):
        raise TTDError(f"TTD_SQL_S3 must be auto, httpfs or fsspec, not {mode!r}")
    return mode


def _pip_extension_dir() -> str | None:
    """Where the `duckdb-ext-*` packages put extension binaries (site-packages/duckdb_ext/extensions)."""
    try:
        import duckdb_ext  # namespace package of duckdb-ext-httpfs
    except ImportError:
        return None
    for base in getattr(duckdb_ext, "__path__", []):
        path = os.path.join(base, "extensions")
        if os.path.isdir(path):
            return path
    return None


def _enable_httpfs(con: duckdb.DuckDBPyConnection) -> bool:
    """Load httpfs if already installed and point it at the same endpoint and credentials as boto would use."""
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        ext_dir = _pip_extension_dir()
        try:
            if ext_dir is None:
                raise duckdb.IOException("httpfs is not installed and no duckdb-ext-httpfs package is present")
            con.execute(f"SET extension_directory = {_quote(ext_dir)}")
            con.execute("LOAD httpfs")
        except duckdb.Error as exc:
            log.debug("httpfs unavailable (%s); using fsspec", str(exc).splitlines()[0])
            return False
    opts = ["TYPE s3", "PROVIDER credential_chain"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        opts = ["TYPE s3", f"ENDPOINT {_quote(host.rstrip('/'))}", "URL_STYLE 'path'",
                f"USE_SSL {'true' if scheme == 'https' else 'false'}"]
        for env, opt in (("AWS_ACCESS_KEY_ID", "KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "SECRET"),
                         ("AWS_SESSION_TOKEN", "SESSION_TOKEN"), ("AWS_DEFAULT_REGION", "REGION")):
            if os.environ.get(env):
                opts.append(f"{opt} {_quote(os.environ[env])}")
    con.execute(f"CREATE OR REPLACE SECRET ttd_s3 ({', '.join(opts)})")
    return True


def _attach_filesystem(con: duckdb.DuckDBPyConnection, loc: Location, registered: set[str], mode: str) -> None:
    if loc.protocol == "file" or loc.protocol in registered:
        return
    if loc.protocol == "s3" and mode in ("auto", "httpfs") and _enable_httpfs(con):
        registered.add("s3")
        return
    if mode == "httpfs" and loc.protocol == "s3":
        raise TTDError("TTD_SQL_S3=httpfs but DuckDB's httpfs extension does not load here; use fsspec or auto")
    con.register_filesystem(loc.fs)
    registered.add(loc.protocol)


def _dir(loc: Location, path: str | None = None) -> str:
    return loc.uri(path).rstrip("/") + "/"


def connect(store_uri: str, corpora: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
    """A locked, read-only DuckDB connection with the store's views."""
    store = Store(store_uri)
    con = duckdb.connect()
    mode = _s3_mode()
    registered: set[str] = set()
    _attach_filesystem(con, store.root, registered, mode)
    allowed = [_dir(store.root)]
    manifests = store.manifests()

    states = table_states(store, manifests)
    for name in schemas.parquet_tables():
        schema = schemas.get(name)
        if name in SHARD_TABLES:  # compacted parts where still valid (`ttd compact`), the shards' own files elsewhere
            mine = [st for st in states if st.table == name]
            parts = [store.root.uri(store.root.join(p["file"])) for st in mine for p in st.parts]
            files = [store.root.uri(store.root.join(f)) for st in mine for f in st.uncovered_files()]
        else:
            parts, files = [], [store.root.uri(p) for p in store.files(name, manifests)]
        # files of one schema version share their columns: DuckDB then reads one file's schema, not every
        # file's (a second or more at 10,000 files); mixed versions are unioned by name
        versions = {m.get("schema_versions", {}).get(name) for m in manifests if name in m.get("files", {})}
        by_name = "true" if len(versions) > 1 else "false"
        sources = []
        if parts:
            sources.append(f"SELECT * FROM read_parquet({_list(parts)}, union_by_name={by_name})")
        if files:
            sources.append(f"SELECT * FROM read_parquet({_list(files)}, hive_partitioning=true, "
                           f"hive_types_autocast=false, union_by_name={by_name})")
        if sources:
            con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(sources))
        else:
            empty = pa.schema(list(schema.arrow) + [pa.field(p, pa.string()) for p in schema.partitioning])
            con.register(f"_empty_{name}", empty.empty_table())
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")

    rows = [{k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in m.items()}
            for m in manifests]
    manifest_cols = ["stage", "stage_version", "model", "corpus", "shard", "run", "fingerprint", "input_fingerprint",
                     "model_id", "config", "files", "rows", "schema_versions", "ttd_version", "committed_at"]
    table = pa.table({c: pa.array([r.get(c) for r in rows],
                                  pa.int64() if c == "stage_version" else pa.string()) for c in manifest_cols})
    con.register("_manifests", table)
    con.execute("CREATE VIEW manifests AS SELECT * FROM _manifests")

    uris = {d["uri"]: d for d in store.corpora().values()}
    for uri in corpora:
        uris.setdefault(uri, {"uri": uri, "format": "auto", "name": None})
    selects = []
    for i, (uri, doc) in enumerate(sorted(uris.items())):
        corpus = open_corpus(uri, fmt=doc.get("format", "auto"), name=doc.get("name"))
        _attach_filesystem(con, corpus.loc, registered, mode)
        files = corpus.metadata_files()
        if files:
            allowed.append(_dir(corpus.loc))
            source = (f"SELECT * EXCLUDE (filename), regexp_extract(filename, '([^/]+)\\.parquet$', 1) AS shard "
                      f"FROM read_parquet({_list(files)}, union_by_name=true, filename=true)")
            if corpus.format == "parquet":  # image bytes stay out of the metadata view
                source = f"SELECT COLUMNS(lambda c: c NOT IN ('jpg','jpeg','png','webp','bmp')) FROM ({source})"
        else:
            meta = corpus.metadata_table()
            if meta is None:
                continue
            con.register(f"_corpus_{i}", meta)
            source = f"SELECT * FROM _corpus_{i}"
        selects.append(f"SELECT {_quote(corpus.name)} AS corpus, * FROM ({source})")
    if selects:
        con.execute("CREATE VIEW samples_all AS " + " UNION ALL BY NAME ".join(selects))
    else:
        con.execute("CREATE VIEW samples_all AS SELECT NULL::VARCHAR AS corpus, NULL::VARCHAR AS key, "
                    "NULL::VARCHAR AS caption, NULL::VARCHAR AS status, NULL::VARCHAR AS shard WHERE false")
    con.execute("CREATE VIEW samples AS SELECT * FROM samples_all WHERE coalesce(status, 'success') = 'success'")

    con.execute(f"SET allowed_directories = {_list(sorted(set(allowed)))}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def plain(table: pa.Table) -> pa.Table:
    """The result as text formats should show it: BLOBs as hex, FLOATs (float32) at their shortest decimal
    (0.338, not the float64 0.33799999952316284 they widen to)."""
    import pyarrow.compute as pc

    columns = []
    for col in table.columns:
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            col = pa.array([None if v is None else v.hex() for v in col.to_pylist()], pa.string())
        elif pa.types.is_float32(col.type) or pa.types.is_float16(col.type):
            col = pc.cast(pc.cast(col, pa.string()), pa.float64())
        columns.append(col)
    return pa.table(columns, names=table.column_names)


def render(table: pa.Table, max_rows: int | None, max_width: int) -> str:
    """DuckDB's own box rendering (numbers as DuckDB prints them, a footer saying how many rows and columns are
    shown), BLOBs as their size."""
    import contextlib
    import io

    import pyarrow.compute as pc

    columns = [pc.binary_join_element_wise("<", pc.cast(pc.binary_length(c), pa.string()), " bytes>", "")
               if pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type) else c for c in table.columns]
    shown = pa.table(columns, names=table.column_names)
    con = duckdb.connect()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        con.from_arrow(shown).show(max_rows=max_rows if max_rows is not None else max(1, table.num_rows),
                                   max_width=max_width)
    con.close()
    return text.getvalue().rstrip("\n")


WRITERS = {".parquet": "FORMAT parquet", ".csv": "FORMAT csv, HEADER true", ".json": "FORMAT json"}


def write(table: pa.Table, path: str, store_uri: str) -> str:
    """Write a result with DuckDB's own writer (Parquet, CSV or newline-delimited JSON, by the file's suffix) to a
    local file outside the store; returns the absolute path."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if "://" in path:
        raise TTDError(f"--out {path!r}: give a local file path")
    if suffix not in WRITERS:
        raise TTDError(f"--out {path!r}: the file name must end in {', '.join(WRITERS)}")
    target = Path(path).resolve()
    store = Store(store_uri).root
    if store.protocol == "file" and (target == Path(store.path).resolve()
                                     or Path(store.path).resolve() in target.parents):
        raise UnsafeQueryError(f"--out {path!r} is inside the store: ttd sql never writes into a store")
    target.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.register("result", table)
    con.execute(f"COPY result TO {_quote(str(target))} ({WRITERS[suffix]})")
    con.close()
    return str(target)


def query(store_uri: str, sql: str, corpora: Iterable[str] = ()) -> pa.Table:
    """Run one read-only SELECT over the store and return the result as an Arrow table."""
    con = connect(store_uri, corpora)
    check_read_only(con, sql)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise UnsafeQueryError(f"refused: {str(exc).splitlines()[0]} (ttd sql reads only the store and its "
                               "corpora)") from None
    except duckdb.Error as exc:
        raise TTDError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
