import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_corpus, jpeg

from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.errors import TTDError, UnsafeQueryError
from ttd.stages.index import run_index
from ttd.store.sql import query
from ttd.store.uri import resolve


def scalar(store, sql, corpora=()):
    return query(store, sql, corpora).to_pylist()[0]


def bad_corpus(uri):
    root = resolve(uri)
    w = ShardWriter(root, 0)
    w.add(make_key(0, 0), "fine", jpeg(0), width=32, height=32)
    w.add(make_key(0, 1), "zero", b"", width=32, height=32)
    w.add(make_key(0, 2), "broken", jpeg(1)[:200], width=32, height=32)
    w.add(make_key(0, 3), None, None, status="failed_to_download", error_message="timeout")
    w.close()
    w = ShardWriter(root, 1)
    w.add(make_key(1, 0), "fine too", jpeg(2), width=32, height=32)
    w.close()


def test_index_then_sql(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    bad_corpus(corpus)
    summary = run_index(corpus, store)
    assert summary["done"] == 2 and summary["samples"] == 4 and summary["errors"] == 2
    assert summary["skipped_status"] == {"failed_to_download": 1}
    assert scalar(store, "SELECT count(*) AS n FROM samples")["n"] == 4  # the corpus's success count
    assert scalar(store, "SELECT count(*) AS n FROM samples_all")["n"] == 5
    errs = query(store, "SELECT key, error_type, stage, shard FROM errors ORDER BY key").to_pylist()
    assert errs == [
        {"key": "000000001", "error_type": "empty_image", "stage": "read", "shard": "00000"},
        {"key": "000000002", "error_type": "corrupt_image", "stage": "read", "shard": "00000"},
    ]
    m = query(store, "SELECT stage, corpus, shard FROM manifests ORDER BY shard").to_pylist()
    assert m == [{"stage": "index", "corpus": "c", "shard": "00000"}, {"stage": "index", "corpus": "c",
                                                                        "shard": "00001"}]
    # empty tables still have views with their schema
    assert scalar(store, "SELECT count(*) AS n FROM relevancy")["n"] == 0
    # a second run does nothing; a new shard is the only work of the third
    again = run_index(corpus, store)
    assert again["done"] == 0 and again["skipped_done"] == 2
    w = ShardWriter(resolve(corpus), 2)
    w.add(make_key(2, 0), "new", jpeg(5), width=32, height=32)
    w.close()
    third = run_index(corpus, store)
    assert third["done"] == 1 and third["skipped_done"] == 2
    assert scalar(store, "SELECT count(*) AS n FROM samples")["n"] == 5


def test_incomplete_shard_waits_until_its_stats_appear(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=2, per_shard=2)
    stats = tmp_path / "c" / "00001_stats.json"
    saved = stats.read_bytes()
    stats.unlink()
    first = run_index(corpus, store)
    assert first["done"] == 1 and first["waiting"] == ["00001"]
    stats.write_bytes(saved)
    second = run_index(corpus, store)
    assert second["done"] == 1 and second["waiting"] == []


@pytest.mark.parametrize("sql", [
    "INSERT INTO errors VALUES ('k','s','t','m','error','x','c','00000')",
    "CREATE TABLE t AS SELECT 1",
    "COPY (SELECT 1) TO 'out.csv'",
    "ATTACH 'other.duckdb'",
    "DROP VIEW errors",
    "SET enable_external_access = true",
    "INSTALL httpfs",
    "SELECT 1; SELECT 2",
])
def test_sql_refuses_writes(tmp_path, sql):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=1, per_shard=1)
    run_index(corpus, store)
    with pytest.raises(UnsafeQueryError):
        query(store, sql)


def test_sql_refuses_files_outside_the_store(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=1, per_shard=1)
    run_index(corpus, store)
    outside = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"x": [1]}), outside)
    for sql in (f"SELECT * FROM read_parquet('{outside}')", "SELECT * FROM read_csv('/etc/passwd')",
                f"SELECT * FROM read_parquet('{store}/../secret.parquet')"):
        with pytest.raises(UnsafeQueryError, match="refused"):
            query(store, sql)
    # files inside the store stay readable by path
    assert scalar(store, f"SELECT count(*) AS n FROM read_json('{store}/_ttd_store.json')")["n"] == 1


def test_sql_errors_are_one_line(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=1, per_shard=1)
    run_index(corpus, store)
    with pytest.raises(TTDError, match="does not parse"):
        query(store, "SELEKT 1")
    with pytest.raises(TTDError, match="query failed"):
        query(store, "SELECT no_such_column FROM tags")
    with pytest.raises(TTDError, match="does not exist"):
        query(str(tmp_path / "nowhere"), "SELECT 1")


def test_sql_extra_corpus_option(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    other = str(tmp_path / "other")
    build_corpus(corpus, shards=1, per_shard=2)
    build_corpus(other, shards=2, per_shard=3, output_format="parquet")
    run_index(corpus, store)
    rows = query(store, "SELECT corpus, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1", [other]).to_pylist()
    assert rows == [{"corpus": "c", "n": 2}, {"corpus": "other", "n": 6}]
    cols = query(store, "SELECT * FROM samples LIMIT 1", [other]).column_names
    assert "jpg" not in cols  # image bytes stay out of the metadata view


@pytest.mark.parametrize("mode", ["fsspec", "httpfs"])
def test_sql_over_s3(s3_bucket, monkeypatch, mode):
    import duckdb

    if mode == "httpfs":
        from ttd.store.sql import _enable_httpfs

        if not _enable_httpfs(duckdb.connect()):  # CI installs duckdb-ext-httpfs (constraints.txt), so this runs
            pytest.skip("DuckDB's httpfs extension is not installed and cannot be downloaded offline")
    monkeypatch.setenv("TTD_SQL_S3", mode)
    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    bad_corpus(corpus)
    run_index(corpus, store)
    assert scalar(store, "SELECT count(*) AS n FROM samples")["n"] == 4
    assert scalar(store, "SELECT count(*) AS n FROM errors")["n"] == 2
    with pytest.raises(UnsafeQueryError):
        query(store, f"SELECT * FROM read_parquet('{s3_bucket}/elsewhere/x.parquet')")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(query(store, "SELECT * FROM manifests").to_pylist())


def test_sql_accepts_the_read_statements_a_reader_needs(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=2, per_shard=2)
    run_index(corpus, store)
    pivot = query(store, "-- samples per shard and status\nPIVOT samples_all ON status USING count(*) GROUP BY shard")
    assert pivot.num_rows == 2 and "success" in pivot.column_names
    assert query(store, "SUMMARIZE samples_all").num_rows > 0
    assert "column_name" in query(store, "DESCRIBE manifests").column_names
    assert query(store, "WITH s AS (SELECT * FROM samples) SELECT count(*) AS n FROM s").to_pylist() == [{"n": 4}]
    for smuggled in ("PIVOT samples_all ON status USING count(*); CREATE TABLE t AS SELECT 1; SELECT 1",
                     "PIVOT samples_all ON status USING count(*); SELECT 1"):
        with pytest.raises(UnsafeQueryError):
            query(store, smuggled)


def test_sql_results_render_like_duckdb_and_write_with_its_writers(tmp_path):
    import duckdb

    from ttd.store.sql import plain, render, write

    table = pa.table({"key": ["a", "b", "c"], "score": pa.array([0.338, 0.5, 1 / 3], pa.float32()),
                      "heatmap": pa.array([b"\x00C,E2H", b"", None])})
    text = render(table, max_rows=None, max_width=120)
    assert "<6 bytes>" in text and "0.338" in text and "NULL" in text and "0.33799" not in text
    many = render(pa.table({"i": list(range(100))}), max_rows=10, max_width=120)
    assert "100 rows" in many and "(10 shown)" in many and " 99 │" in many and " 50 │" not in many
    assert plain(table).to_pylist()[0] == {"key": "a", "score": 0.338, "heatmap": "00432c453248"}
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=1, per_shard=1)
    run_index(corpus, store)
    for suffix in (".parquet", ".csv", ".json"):
        path = write(table, str(tmp_path / f"result{suffix}"), store)
        reader = {".parquet": "read_parquet", ".csv": "read_csv", ".json": "read_json"}[suffix]
        assert duckdb.sql(f"SELECT count(*) FROM {reader}('{path}')").fetchone()[0] == 3
    with pytest.raises(UnsafeQueryError, match="inside the store"):
        write(table, f"{store}/tags/x.parquet", store)
    with pytest.raises(TTDError, match="must end in"):
        write(table, str(tmp_path / "result.txt"), store)


def test_compaction_keeps_every_query_the_same_and_never_serves_a_re_committed_shard(tmp_path):
    """`ttd compact` copies many shards' rows into a few parts; `ttd sql` reads the parts while their shards keep
    the fingerprints they were made from, and a shard re-committed since from its own files."""
    from ttd.configs import ParseConfig
    from ttd.stages.parse import run_parse
    from ttd.store.compact import compact
    from ttd.store.store import Store

    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=5, per_shard=4)
    run_parse(corpus, store, ParseConfig(tagger=False))
    checks = ["SELECT shard, key, tag_index, text FROM tags ORDER BY ALL",
              "SELECT shard, key, caption FROM captions ORDER BY ALL",
              "SELECT shard, count(*) FROM errors GROUP BY shard ORDER BY shard"]
    before = [query(store, q).to_pylist() for q in checks]
    first = compact(store, rows_per_file=30)
    assert first["parts_written"] >= 3 and compact(store)["parts_written"] == 0  # idempotent
    assert [query(store, q).to_pylist() for q in checks] == before
    parts = list((tmp_path / "s" / "compact" / "tags").rglob("*.parquet"))
    assert parts and all("shard" in pq.read_schema(p).names for p in parts)
    # shard 00001 re-committed under another config: its part is stale, its rows come from its own new files
    run_parse(corpus, store, ParseConfig(tagger=False, max_caption_chars=17), shards=["00001"])
    direct = sorted(Store(store).read("tags", columns=["shard", "key", "tag_index", "text"]).to_pylist(),
                    key=lambda r: (r["shard"], r["key"], r["tag_index"], r["text"]))
    assert direct != before[0]  # the cut captions gave shard 00001 other tags
    assert query(store, checks[0]).to_pylist() == direct
    second = compact(store, rows_per_file=30)
    assert second["parts_dropped"] >= 1 and second["parts_written"] >= 1
    assert query(store, checks[0]).to_pylist() == direct
