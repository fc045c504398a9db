"""Shared fixtures: a real S3-compatible server on 127.0.0.1 and img2dataset-format corpora built on the spot."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.store.uri import resolve


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server in this process, reached over real HTTP by s3fs, pyarrow and DuckDB."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing-key-id",
                      AWS_SECRET_ACCESS_KEY="testing-secret", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test: returns its s3:// URI."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"ttd-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def build_corpus(uri: str, *, shards: int = 2, per_shard: int = 5, failed_per_shard: int = 1,
                 output_format: str = "webdataset") -> dict:
    """An img2dataset-format corpus with `failed_per_shard` failed downloads per shard. Returns keys by status."""
    root = resolve(uri)
    ok, failed = [], []
    for s in range(shards):
        w = ShardWriter(root, s, output_format=output_format)
        for i in range(per_shard + failed_per_shard):
            key = make_key(s, i)
            if i < failed_per_shard:
                w.add(key, None, None, status="failed_to_download", error_message="HTTP 404")
                failed.append(key)
            else:
                w.add(key, f"a photo number {i} of shard {s}", jpeg(s * 100 + i), width=32, height=32)
                ok.append(key)
        w.close()
    return {"success": ok, "failed": failed}


@pytest.fixture
def wds_corpus(tmp_path):
    uri = str(tmp_path / "corpus")
    return uri, build_corpus(uri)


def write_simple_tags(store_uri: str, corpus_uri: str, fingerprint: str = "simple") -> None:
    """Commit a `parse`-stage `tags` table made by splitting captions on spaces (tests of later stages only)."""
    import pyarrow as pa

    from ttd.corpus import Sample, open_corpus
    from ttd.store import schemas
    from ttd.store.store import Store

    store = Store(store_uri, create=True)
    corpus = open_corpus(corpus_uri)
    for shard in corpus.shards():
        rows = []
        for s in corpus.read_shard(shard):
            if not isinstance(s, Sample) or not s.caption:
                continue
            pos = 0
            for i, word in enumerate(s.caption.split()):
                start = s.caption.index(word, pos)
                pos = start + len(word)
                rows.append({"key": s.key, "tag_index": i, "text": word, "lower": word.lower(), "lemma": word.lower(),
                             "pos": None, "char_start": start, "char_end": pos, "is_stop": word in ("a", "of"),
                             "is_alpha": word.isalpha(), "is_compound": False, "policy": "words",
                             "caption_truncated": False})
        table = pa.Table.from_pylist(rows, schema=schemas.get("tags").arrow)
        store.commit("parse", shard.partition, fingerprint, {"tags": table})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_node(*args: str, env: dict[str, str] | None = None):
    """`ray start ... --block` in its own session, as on a cloud cluster's node; stopped by signalling that session
    only (`ray stop` would stop every Ray on the machine, a developer's running pipeline included). `env`: more
    variables for the node (and so for the jobs it runs)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    node = subprocess.Popen([ray_bin, "start", *args, "--disable-usage-stats", "--block"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield node
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)


def outside_rows(store: str, table: str, cols: list[str]) -> dict[str, list[tuple]]:
    """A table's rows as readers outside ttd see them, straight from the folders (no manifests): DuckDB's
    `read_parquet` and Polars' `scan_parquet` over `tables/TABLE/**/*.parquet`, hive partitions read as strings."""
    import duckdb
    import polars as pl

    glob = f"{store}/tables/{table}/**/*.parquet"
    if not list(Path(store, "tables", table).rglob("*.parquet")):
        return {"duckdb": [], "polars": []}
    duck = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet('{glob}', hive_partitioning = true, "
                      "hive_types_autocast = false)").fetchall()
    polars = pl.scan_parquet(glob, hive_partitioning=True, hive_schema={"corpus": pl.String, "shard": pl.String}
                             ).select(cols).collect().rows()
    return {"duckdb": sorted(duck), "polars": sorted(polars)}


def committed_rows(store: str, table: str, cols: list[str]) -> list[tuple]:
    """The same table's rows as ttd reads them: the files its manifests name."""
    from ttd.store.store import MARKER, Store

    if not Path(store, MARKER).exists():  # killed before the store was made
        return []
    t = Store(store).read(table, columns=cols)
    return sorted(zip(*(t[c].to_pylist() for c in cols)))
