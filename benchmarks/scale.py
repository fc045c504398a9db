"""Issue 17's scale benchmark: planning and re-runs over img2dataset webdataset corpora of many tiny shards (one
sample each), on local disk and on a real S3-compatible server (moto, in its own process, or one already running:
`--endpoint`) reached through a proxy that adds a fixed latency to every request (tests/faultproxy.py, `slow` at
rate 1). On S3 the corpus and the store are in buckets of their own (`--one-bucket`: both in one, session 12's
layout). moto answers a listing page by sorting every key under the prefix (and scanning the rest of the
bucket): `plan_listing_floor_s`, boto3 listing the same keys alone, is what any client pays there.
Timed phases start and end with a line on stderr.

Per corpus size N (`--shards`), locally and (with `--s3`) on S3:

  plan        the first plan of `parse` (nothing committed): corpus listing + manifest listing
  first       the first `ttd parse --no-tagger` of the whole corpus (local only: on S3 the store and corpus are
              uploaded from the local run, see `first-s3` for the first run's own figure)
  noop-parse  a re-run of parse that finds nothing new, in this process (warm imports) and as a cold `ttd parse`
  noop-score  the same for `ttd score --workers 0` over a store whose score stage is committed: the benchmark commits
              empty score outputs under the planner's own fingerprints (what is timed is ttd's no-op run, which
              reads manifests only; scoring 10,000 shards for real would take hours on 2 cores)
  overlap     a question, not what ttd does: the score stage's three planning listings one after the other (as
              `plan` makes them) and at the same time (threads), best of 2 each: the ratio
  new10       10 new shards appended to the corpus: the run that parses them (planning included), and its plan alone
  first-s3    (`--first-s3 M`) the first parse of a separate M-shard corpus with corpus and store on S3

`--sql-rows R`: a `tags` and a `relevancy` table of R rows each over the largest N's shards (synthetic rows,
committed through the store), then cold `ttd sql` runs (count per lemma, the relevancy-tags join), `ttd compact`,
the same queries over the compacted store, and `SELECT 1` (the process's and the views' fixed cost).

    .venv/bin/python benchmarks/scale.py --shards 1000 10000 --s3 --latency-ms 20 --first-s3 500 \\
        --sql-rows 10000000 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import jpeg  # noqa: E402  tests/conftest.py: a tiny JPEG
from faultproxy import FaultProxy  # noqa: E402  tests/faultproxy.py: the latency in front of the S3 server

from ttd.configs import ParseConfig, ScoreConfig
from ttd.corpus import open_corpus  # noqa: E402
from ttd.corpus.img2dataset_writer import ShardWriter, make_key  # noqa: E402
from ttd.stages.engine import TODO, plan  # noqa: E402
from ttd.stages.parse import STAGE as PARSE_STAGE  # noqa: E402
from ttd.stages.parse import run_parse
from ttd.stages.parse import stage_spec as parse_spec  # noqa: E402
from ttd.stages.score import STAGE as SCORE_STAGE  # noqa: E402
from ttd.stages.score import STAGE_VERSION as SCORE_VERSION  # noqa: E402
from ttd.stages.score import result_config, run_score  # noqa: E402
from ttd.stages.score import stage_spec as score_spec  # noqa: E402
from ttd.store import schemas  # noqa: E402
from ttd.store.store import Store  # noqa: E402
from ttd.text.nlp import english_model_id  # noqa: E402

MODEL = "ttd-micro"
PARSE = ParseConfig(tagger=False)
TTD = [sys.executable, "-m", "ttd.cli.main"]


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def cold(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def add_shards(root: str, first: int, n: int) -> None:
    """`n` one-sample shards numbered from `first` (build_corpus numbers from 0)."""
    from ttd.store.uri import resolve

    loc = resolve(root)
    for s in range(first, first + n):
        w = ShardWriter(loc, s)
        w.add(make_key(s, 0), f"a photo of a dog and a cat number {s}", _JPEG, width=8, height=8)
        w.close()


_JPEG = jpeg(1)


def commit_empty_scores(store_uri: str, corpus_uri: str) -> int:
    """Score manifests for every parsed shard, under the fingerprints `ttd score --workers 0` plans with on this
    machine, with empty output tables: a store whose score stage is done, for the no-op run's planning."""
    from ttd.models import model_identity

    config = ScoreConfig().resolved("cpu")
    store, corpus = Store(store_uri), open_corpus(corpus_uri)
    planned = [p for p in plan(corpus, store, score_spec(config, model_identity(MODEL, None))) if p.status == TODO]
    committed = store.committed(SCORE_STAGE, corpus.name)
    empty = {t: schemas.get(t).arrow.empty_table() for t in ("relevancy", "masks", "errors")}

    def commit(p) -> None:  # fresh where no score manifest exists: the benchmark's own store, no killed run left files
        store.commit(SCORE_STAGE, p.shard.partition, p.fingerprint, empty, stage_version=SCORE_VERSION,
                     config=result_config(config), model_id="benchmark", input_fingerprint=p.input_fingerprint,
                     fresh=p.shard.name not in committed)

    with ThreadPoolExecutor(16) as pool:  # the store's requests overlap, as a run's shards do
        list(pool.map(commit, planned))
    store.committed(SCORE_STAGE, corpus.name)  # the stage's manifest index, as a run's end writes it
    return len(planned)


def noop_runs(corpus: str, store: str, env: dict[str, str]) -> dict:
    out = {}
    t, summary = timed(run_parse, corpus, store, PARSE)
    assert summary["done"] == 0 and summary["skipped_done"] > 0, summary
    out["noop_parse_s"] = round(t, 2)
    out["noop_parse_cold_s"] = round(cold([*TTD, "parse", "--corpus", corpus, "--store", store, "--no-tagger",
                                           "--json"], env), 2)
    t, summary = timed(run_score, corpus, store, model=MODEL, workers=0)
    assert summary["done"] == 0 and summary["skipped_done"] > 0, summary
    out["noop_score_s"] = round(t, 2)
    out["noop_score_cold_s"] = round(cold([*TTD, "score", "--corpus", corpus, "--store", store, "--model", MODEL,
                                           "--workers", "0", "--json"], env), 2)
    return out


def overlapped_plan(corpus: str, store: str) -> dict:
    """A question for the planner, not what it does: would the score stage's three listings (the corpus, the score
    and the parse manifests), which `plan` makes one after the other, be faster at the same time? Both ways here,
    best of 2 each, alternating; the ratio is serial / overlapped."""

    def serial() -> None:
        c, st = open_corpus(corpus), Store(store)
        c.shards(), st.committed(SCORE_STAGE, c.name), st.committed(PARSE_STAGE, c.name)

    def overlapped() -> None:
        c, st = open_corpus(corpus), Store(store)
        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(c.shards), pool.submit(st.committed, SCORE_STAGE, c.name),
                      pool.submit(st.committed, PARSE_STAGE, c.name)]:
                f.result()

    times: dict[str, list[float]] = {"serial": [], "overlapped": []}
    for _ in range(2):
        times["serial"].append(timed(serial)[0])
        times["overlapped"].append(timed(overlapped)[0])
    a, b = min(times["serial"]), min(times["overlapped"])
    return {"score_plan_serial_s": round(a, 3), "score_plan_overlapped_s": round(b, 3),
            "score_plan_ratio": round(a / b, 2)}


def plan_from_scratch(corpus: str, store: str) -> list:
    """The parse stage's plan as a run makes it, opening the corpus included: on S3 that opening is the corpus
    listing, which s3fs then serves `plan` from its cache (session 12's S3 "plan" figure left it out: 6.0 s)."""
    return plan(open_corpus(corpus), Store(store), parse_spec(PARSE, english_model_id()))


def new_shards_run(corpus: str, store: str, n: int, requests: Callable[[], int] | None = None) -> dict:
    """`requests`: the proxy's request count so far (on S3), to report the run's own requests."""
    add = _add_new(corpus, n)
    t_plan, planned = timed(plan_from_scratch, corpus, store)
    assert sum(p.status == TODO for p in planned) == add
    before = requests() if requests else 0
    t, summary = timed(run_parse, corpus, store, PARSE)
    assert summary["done"] == add, summary
    out = {"new10_plan_s": round(t_plan, 2), "new10_run_s": round(t, 2)}
    if requests:
        out["new10_run_requests"] = requests() - before
    return out


def _add_new(corpus: str, n: int) -> int:
    existing = len(open_corpus(corpus).shards())
    if corpus.startswith("s3://"):
        with tempfile.TemporaryDirectory() as tmp:
            add_shards(tmp, existing, n)
            _upload(tmp, corpus)
    else:
        add_shards(corpus, existing, n)
    return n


def _upload(local: str, uri: str) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    files = [str(p) for p in Path(local).rglob("*") if p.is_file()]
    fs.put(files, [f"{uri}/{Path(f).relative_to(local)}" for f in files])


def local_size(n: int, tmp: Path) -> dict:
    corpus, store = str(tmp / f"corpus-{n}"), str(tmp / f"store-{n}")
    add_shards(corpus, 0, n)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    row: dict = {"where": "local", "shards": n}
    Store(store, create=True)
    t, planned = timed(plan_from_scratch, corpus, store)
    row["plan_s"] = round(t, 2)
    t, summary = timed(run_parse, corpus, store, PARSE)
    assert summary["done"] == n
    row["first_parse_s"] = round(t, 1)
    row["first_parse_ms_per_shard"] = round(1000 * t / n, 2)
    commit_empty_scores(store, corpus)
    row.update(noop_runs(corpus, store, env))
    row["noop_parse_ms_per_shard"] = round(1000 * row["noop_parse_s"] / n, 3)
    # planning alone over the committed store (corpus listing, manifest listing and index), best of 3
    best = min(timed(plan_from_scratch, corpus, store)[0] for _ in range(3))
    row["noop_plan_s"], row["noop_plan_us_per_shard"] = round(best, 3), round(1e6 * best / n, 1)
    # ... and its two reads alone: the corpus listing with its fingerprints, the stage's manifests (listing + index)
    name = open_corpus(corpus).name
    best = min(timed(lambda: open_corpus(corpus).shards())[0] for _ in range(3))
    row["corpus_listing_us_per_shard"] = round(1e6 * best / n, 1)
    best = min(timed(lambda: Store(store).committed(PARSE_STAGE, name))[0] for _ in range(3))
    row["manifests_us_per_shard"] = round(1e6 * best / n, 1)
    row.update(overlapped_plan(corpus, store))
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in its own process (its request handling must not share this process's GIL), or, with an
    `endpoint`, an S3-compatible server already running there (MinIO: infra/compose.yaml; credentials from the
    environment's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""

    def __init__(self, endpoint: str | None = None):
        self.endpoint, self.proc = endpoint, None

    def __enter__(self) -> str:
        if self.endpoint:
            os.environ["AWS_ENDPOINT_URL"] = self.endpoint
            return self.endpoint
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        return os.environ["AWS_ENDPOINT_URL"]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def phase(what: str) -> None:
    """A line on stderr when a timed phase starts or ends: whoever shares the machine knows when to keep it quiet."""
    print(f"[scale {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def s3_locations(name: str, one_bucket: bool) -> tuple[str, str]:
    """The corpus and store URIs of a benchmark corpus: in buckets of their own (img2dataset's output bucket and
    the pipeline's, as users lay them out), or both in one bucket (`--one-bucket`, session 12's layout). A bucket
    is made when missing."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    buckets = [name] if one_bucket else [f"{name}-corpus", f"{name}-store"]
    for bucket in buckets:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return f"s3://{buckets[0]}/corpus", f"s3://{buckets[-1]}/store"


def s3_size(n: int, tmp: Path, endpoint: str, latency_s: float, one_bucket: bool = False) -> dict:
    """An N-shard corpus uploaded to the server and parsed there without the proxy (object fingerprints are ETags,
    not the local files' times), its score stage committed; then timed through the latency proxy."""
    import s3fs

    corpus, store = s3_locations(f"scale-{n}", one_bucket)
    phase(f"S3 {n} shards: preparing (not timed)")
    add_shards(str(tmp / f"s3-corpus-{n}"), 0, n)
    _upload(str(tmp / f"s3-corpus-{n}"), corpus)
    row: dict = {"where": f"S3 +{latency_s * 1000:.0f} ms", "shards": n, "buckets": 1 if one_bucket else 2}
    t0 = time.perf_counter()
    for attempt in range(5):  # moto answers 500 now and then under load (a listing too): the next run goes on
        try:
            if not run_parse(corpus, store, PARSE, io_threads=8)["failed"]:
                break
        except Exception as exc:  # noqa: BLE001 - preparation only
            print(f"preparing the store, attempt {attempt + 1}: {type(exc).__name__}: {exc}", flush=True)
    row["first_parse_no_latency_s"] = round(time.perf_counter() - t0, 1)
    commit_empty_scores(store, corpus)
    phase(f"S3 {n} shards: timing")
    with FaultProxy(endpoint, {"slow": 1.0}, slow_s=(latency_s, latency_s)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            row.update(noop_runs(corpus, store, env))
            row["noop_parse_ms_per_shard"] = round(1000 * row["noop_parse_s"] / n, 3)
            row["requests_noop"] = proxy.counts["requests"]
            # the plan alone (corpus listing included), best of 2, against the listings any client must make
            row["noop_plan_s"] = round(min(timed(plan_from_scratch, corpus, store)[0] for _ in range(2)), 2)
            name = corpus.rsplit("/", 1)[-1]
            floor = listing_floor([corpus, f"{store}/manifests/{PARSE_STAGE}/corpus={name}"])
            row["plan_listing_floor_s"] = round(floor, 2)
            row["plan_over_floor"] = round(row["noop_plan_s"] / floor, 2)
            row.update(overlapped_plan(corpus, store))
            row.update(new_shards_run(corpus, store, 10, lambda: proxy.counts["requests"]))
        finally:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
    phase(f"S3 {n} shards: timed")
    return row


def listing_floor(uris: list[str]) -> float:
    """The listings a plan cannot do without (the corpus, the stage's manifests), made by boto3's paginator alone
    (no ttd, no s3fs), best of 2: what any client pays for them on this server, the baseline of `noop_plan_s`."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def once() -> int:
        keys = 0
        for uri in uris:
            bucket, _, prefix = uri.removeprefix("s3://").partition("/")
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                keys += len(page.get("Contents", []))
        return keys

    return min(timed(once)[0] for _ in range(2))


def first_parse_s3(m: int, tmp: Path, endpoint: str, latency_s: float, one_bucket: bool = False) -> dict:
    import s3fs

    local = tmp / f"first-{m}"
    add_shards(str(local), 0, m)
    corpus, stores = s3_locations(f"first-{m}", one_bucket)
    _upload(str(local), corpus)
    row: dict = {"where": f"S3 +{latency_s * 1000:.0f} ms", "shards": m, "buckets": 1 if one_bucket else 2}
    phase(f"first parse of {m} shards on S3: timing")
    with FaultProxy(endpoint, {"slow": 1.0}, slow_s=(latency_s, latency_s)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            for threads, label in ((1, "serial"), (None, "overlapped"), (32, "threads32")):
                store = f"{stores}-{label}"
                before = proxy.counts["requests"]
                t, summary = timed(run_parse, corpus, store, PARSE, io_threads=threads)
                row[f"requests_per_shard_{label}"] = round((proxy.counts["requests"] - before) / m, 1)
                failed = len(summary["failed"])  # a shard the server failed (moto answers 500 under load) is left
                if failed:                       # for the next run, as in production: that run is timed too
                    t2, again = timed(run_parse, corpus, store, PARSE, io_threads=threads)
                    t, summary["done"] = t + t2, summary["done"] + again["done"]
                    row[f"first_parse_{label}_failed_then_redone"] = failed
                assert summary["done"] == m, summary
                row[f"first_parse_{label}_s"] = round(t, 1)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
    phase(f"first parse of {m} shards on S3: timed")
    row["overlap_speedup"] = round(row["first_parse_serial_s"] / row["first_parse_overlapped_s"], 2)
    return row


def sql_tables(n_shards: int, rows: int, tmp: Path) -> dict:
    """Synthetic `tags` and `relevancy` rows (rows / n_shards per shard, 5,000 distinct lemmas) committed through
    the store, then cold `ttd sql` runs."""
    store_uri = str(tmp / "sql-store")
    store = Store(store_uri, create=True)
    per = rows // n_shards
    rng = np.random.default_rng(0)
    lemmas = np.array([f"w{i}" for i in range(5000)], dtype=object)
    tag_schema, rel_schema = schemas.get("tags").arrow, schemas.get("relevancy").arrow
    for s in range(n_shards):
        keys = np.array([f"{s:05d}{i // 8:04d}" for i in range(per)], dtype=object)
        index = np.arange(per) % 8
        words = lemmas[rng.integers(0, len(lemmas), per)]
        cols = {"key": keys, "tag_index": index, "text": words, "lower": words, "lemma": words, "pos": ["NOUN"] * per,
                "char_start": index * 4, "char_end": index * 4 + 3, "is_stop": np.zeros(per, bool),
                "is_alpha": np.ones(per, bool), "is_compound": np.zeros(per, bool), "policy": ["words"] * per,
                "caption_truncated": np.zeros(per, bool)}
        tags = pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(per, f.type)
                         for f in tag_schema})
        score = rng.random(per).astype(np.float32)
        rcols = {"key": keys, "tag_index": index, "text": words, "pixel_raw": score, "image_raw": score,
                 "text_raw": score, "pixel_score": score, "image_score": score, "text_score": score,
                 "selected": score > 0.5, "threshold": np.full(per, 0.5, np.float32), "model_id": ["bench"] * per,
                 "head": ["sclip"] * per}
        rel = pa.table({f.name: pa.array(rcols[f.name], f.type) if f.name in rcols else pa.nulls(per, f.type)
                        for f in rel_schema})
        part = {"corpus": "c", "shard": f"{s:05d}"}
        store.commit("parse", part, "bench", {"tags": tags})
        store.commit("score", part, "bench", {"relevancy": rel})
    for stage in ("parse", "score"):  # the manifest index, as the end of a real run writes it
        store.committed(stage, "c")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    queries = {
        "count_per_lemma_s": "SELECT lemma, count(*) AS n FROM tags GROUP BY lemma ORDER BY n DESC LIMIT 10",
        "join_relevancy_tags_s": "SELECT t.lemma, avg(r.selected::INT) AS rate FROM relevancy r JOIN tags t USING "
                                 "(corpus, shard, key, tag_index) GROUP BY t.lemma ORDER BY rate DESC LIMIT 10",
    }
    row: dict = {"rows": per * n_shards, "files_per_table": n_shards}
    for name, sql in queries.items():
        row[name] = round(min(cold([*TTD, "sql", "--store", store_uri, sql], env) for _ in range(2)), 2)
    row["compact_s"] = round(cold([*TTD, "compact", "--store", store_uri], env), 1)
    for name, sql in queries.items():
        row[f"compacted_{name}"] = round(min(cold([*TTD, "sql", "--store", store_uri, sql], env) for _ in range(2)), 2)
    row["sql_select_1_s"] = round(min(cold([*TTD, "sql", "--store", store_uri, "SELECT 1"], env) for _ in range(2)), 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="*", default=[1000, 10000], help="corpus sizes (none: only --sql-rows)")
    ap.add_argument("--s3", action="store_true", help="also on a local S3 server behind the latency proxy")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--endpoint", help="an S3-compatible server already running (e.g. MinIO, infra/compose.yaml) "
                                       "instead of moto; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    ap.add_argument("--one-bucket", action="store_true", help="corpus and store in one bucket (session 12's layout; "
                                                                "default: a bucket each)")
    ap.add_argument("--first-s3", type=int, default=0, help="shards of the first-parse-on-S3 run (0: skip)")
    ap.add_argument("--sql-rows", type=int, default=0, help="rows of the ttd sql tables (0: skip)")
    ap.add_argument("--sql-shards", type=int, help="shards (files per table) of the ttd sql tables (default: the "
                                                   "largest --shards)")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="ttd-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.shards:
            phase(f"local {n} shards: timing")
            row = local_size(n, tmp)
            rows.append(row)
            print(json.dumps(row), flush=True)
            row.update(new_shards_run(str(tmp / f"corpus-{n}"), str(tmp / f"store-{n}"), 10))
            phase(f"local {n} shards: timed")
            print(json.dumps(row), flush=True)
        if args.s3 or args.first_s3:
            with S3Server(args.endpoint) as endpoint:
                for n in args.shards if args.s3 else []:
                    rows.append(s3_size(n, tmp, endpoint, args.latency_ms / 1000, args.one_bucket))
                    print(json.dumps(rows[-1]), flush=True)
                if args.first_s3:
                    rows.append(first_parse_s3(args.first_s3, tmp, endpoint, args.latency_ms / 1000, args.one_bucket))
                    print(json.dumps(rows[-1]), flush=True)
        if args.sql_rows:
            rows.append(sql_tables(args.sql_shards or max(args.shards), args.sql_rows, tmp))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
