import json

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from ttd.errors import SchemaError, TTDError
from ttd.store import schemas
from ttd.store.store import Store, fingerprint


def errors_rows(n, stage="read", prefix="k"):
    return pa.Table.from_pylist(
        [{"key": f"{prefix}{i}", "stage": stage, "error_type": "corrupt_image", "message": "m", "severity": "error",
          "source": "x"} for i in range(n)],
        schema=schemas.get("errors").arrow,
    )


def part(shard, corpus="c"):
    return {"corpus": corpus, "shard": shard}


def test_commit_read_and_filter_pushdown(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("index", part("00000"), "fp0", {"errors": errors_rows(3)})
    store.commit("index", part("00001"), "fp1", {"errors": errors_rows(2)})
    store.commit("index", part("00000", "other"), "fp2", {"errors": errors_rows(4)})
    assert store.read("errors").num_rows == 9
    t = store.read("errors", filter=(ds.field("corpus") == "c") & (ds.field("shard") == "00001"))
    assert t.num_rows == 2 and set(t["shard"].to_pylist()) == {"00001"}
    assert store.is_done("index", part("00000"), "fp0")
    assert not store.is_done("index", part("00000"), "other-fp")
    assert not store.is_done("index", part("00009"), "fp0")
    # hive layout on disk
    assert (tmp_path / "s/tables/errors/corpus=c/shard=00001/index-fp1.parquet").is_file()
    assert (tmp_path / "s/manifests/index/corpus=c/shard=00001.json").is_file()


def test_half_written_shard_is_invisible_and_redone(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "s"), create=True)
    real = Store._atomic_write

    def crash_on_manifest(self, path, data):
        if "/manifests/" in path:
            raise KeyboardInterrupt("killed between data and manifest")
        return real(self, path, data)

    monkeypatch.setattr(Store, "_atomic_write", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.commit("index", part("00000"), "fp", {"errors": errors_rows(5)})
    monkeypatch.setattr(Store, "_atomic_write", real)
    # the failed commit removed the file it had moved into place (outside readers would count it)
    assert not (tmp_path / "s/tables/errors/corpus=c/shard=00000/index-fp.parquet").exists()
    assert store.read("errors").num_rows == 0
    assert not store.is_done("index", part("00000"), "fp")
    store.commit("index", part("00000"), "fp", {"errors": errors_rows(5)})
    assert store.read("errors").num_rows == 5  # redone, no duplicates
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_a_killed_commits_file_is_removed_by_the_next_commit_that_is_not_fresh(tmp_path):
    """A SIGKILL between the move and the manifest leaves a data file no manifest names (its claim too, so the
    next run takes the claim over and commits with fresh=False); a failed commit undoes its moves itself."""
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("index", part("00000"), "killed", {"errors": errors_rows(2)})
    (tmp_path / "s/manifests/index/corpus=c/shard=00000.json").unlink()  # as if killed before the manifest
    orphan = tmp_path / "s/tables/errors/corpus=c/shard=00000/index-killed.parquet"
    assert orphan.exists()
    store.commit("index", part("00000"), "fp", {"errors": errors_rows(5)}, fresh=False)
    assert not orphan.exists() and store.read("errors").num_rows == 5
    # a move that fails after moving: what it moved is removed, the shard's committed files are kept
    real = Store._move_all

    def fail_after_first(self, moves):
        real(self, moves[:1])
        raise OSError("network gone")

    Store._move_all = fail_after_first
    try:
        with pytest.raises(OSError):
            store.commit("index", part("00000"), "fp2", {"errors": errors_rows(1)})
    finally:
        Store._move_all = real
    assert store.read("errors").num_rows == 5
    assert sorted(p.name for p in (tmp_path / "s/tables/errors/corpus=c/shard=00000").iterdir()) == [
        "index-fp.parquet"]


def test_new_fingerprint_replaces_old_files(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("index", part("00000"), "old", {"errors": errors_rows(3)})
    store.commit("index", part("00000"), "new", {"errors": errors_rows(1)})
    assert store.read("errors").num_rows == 1
    files = sorted(p.name for p in (tmp_path / "s/tables/errors/corpus=c/shard=00000").iterdir())
    assert files == ["index-new.parquet"]


def test_two_stages_share_the_errors_table(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("index", part("00000"), "a", {"errors": errors_rows(2, "read")})
    store.commit("parse", part("00000"), "b", {"errors": errors_rows(3, "parse")})
    assert sorted(store.read("errors")["stage"].to_pylist()) == ["parse"] * 3 + ["read"] * 2


def test_writes_are_checked_against_the_schema(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    bad = errors_rows(1).drop_columns(["severity"])
    with pytest.raises(SchemaError, match="missing columns \\['severity'\\]"):
        store.commit("index", part("00000"), "x", {"errors": bad})
    extra = errors_rows(1).append_column("surprise", pa.array([1]))
    with pytest.raises(SchemaError, match="unexpected columns \\['surprise'\\]"):
        store.commit("index", part("00000"), "x", {"errors": extra})
    nulls = errors_rows(1).set_column(1, "stage", pa.array([None], pa.string()))
    with pytest.raises(SchemaError, match="may not hold nulls"):
        store.commit("index", part("00000"), "x", {"errors": nulls})
    wrong = pa.table({"dataset": ["d"], "metric": ["f1"], "method": ["pixel"], "value": ["high"],
                      "fingerprint": ["f"], "model_id": ["m"]})
    with pytest.raises(SchemaError, match="wrong type"):
        store.commit("evaluate", {"run": "r1"}, "x", {"metrics": wrong})
    with pytest.raises(SchemaError, match="partitioned by"):
        store.commit("evaluate", part("00000"), "x", {"metrics": wrong})
    assert store.read("errors").num_rows == 0


def test_unknown_schema_version_is_a_clear_error(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("index", part("00000"), "fp", {"errors": errors_rows(1)})
    path = tmp_path / "s/manifests/index/corpus=c/shard=00000.json"
    doc = json.loads(path.read_text())
    doc["schema_versions"]["errors"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="schema version 99"):
        store.read("errors")


def test_foreign_store_version_and_non_store(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s/_ttd_store.json").write_text(json.dumps({"format": "ttd-store", "version": 7}))
    with pytest.raises(SchemaError, match="version 7"):
        Store(str(tmp_path / "s"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(TTDError, match="not a ttd store"):
        Store(str(tmp_path / "plain"))
    with pytest.raises(TTDError, match="does not exist"):
        Store(str(tmp_path / "missing"))
    with pytest.raises(TTDError, match="'..'"):
        Store(str(tmp_path) + "/x/../s", create=True)


def test_partition_values_are_validated(tmp_path):
    store = Store(str(tmp_path / "s"), create=True)
    for bad in ("../x", "a/b", "", "x y"):
        with pytest.raises(TTDError, match="invalid corpus name"):
            store.commit("index", part("00000", bad), "fp", {"errors": errors_rows(1)})


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint("s", 1, {"a": 1, "b": 2}) == fingerprint("s", 1, {"b": 2, "a": 1})
    assert fingerprint("s", 1, {"a": 1}) != fingerprint("s", 2, {"a": 1})


def test_s3_store(s3_bucket):
    uri = f"{s3_bucket}/store"
    store = Store(uri, create=True)
    store.commit("index", part("00000"), "fp", {"errors": errors_rows(3)})
    store.commit("index", part("00001"), "fp", {"errors": errors_rows(2)})
    again = Store(uri)
    assert again.read("errors").num_rows == 5
    assert again.is_done("index", part("00001"), "fp")
    t = again.read("errors", filter=ds.field("shard") == "00000", columns=["key", "shard"])
    assert t.column_names == ["key", "shard"] and t.num_rows == 3


def test_the_manifest_index_saves_reads_and_never_serves_a_stale_manifest(tmp_path, monkeypatch):
    """Planning reads a stage's manifests through one listing and its index: after the first bulk read the index
    holds them all, the next plan reads only what changed, and a manifest rewritten since is read, not taken from
    the index."""
    from ttd.store.store import INDEX_REWRITE_AFTER

    store = Store(str(tmp_path / "s"), create=True)
    shards = [f"{i:05d}" for i in range(INDEX_REWRITE_AFTER + 6)]
    for s in shards:
        store.commit("parse", part(s), "fp", {"errors": errors_rows(1)})
    fetched = []
    real_cat = type(store.root.fs).cat

    def counting_cat(fs, paths, *a, **kw):
        fetched.extend(paths if isinstance(paths, list) else [paths])
        return real_cat(fs, paths, *a, **kw)

    monkeypatch.setattr(type(store.root.fs), "cat", counting_cat)
    assert set(store.committed("parse", "c")) == set(shards) and len(fetched) == len(shards)
    assert (tmp_path / "s" / "manifests" / "_index" / "parse.parquet").exists()
    fetched.clear()
    assert {d["fingerprint"] for d in store.committed("parse", "c").values()} == {"fp"} and fetched == []
    store.commit("parse", part(shards[3]), "fp-new", {"errors": errors_rows(2)})
    committed = store.committed("parse", "c")
    assert committed[shards[3]]["fingerprint"] == "fp-new" and len(fetched) == 1
    assert len(store.manifests()) == len(shards) and store.read("errors").num_rows == len(shards) + 1
