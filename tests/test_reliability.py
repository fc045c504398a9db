"""Faults survived and nothing lost (docs/RELIABILITY.md): SIGKILL at random points of `ttd score`, `ttd parse` and
`ttd distill` with resume; object-store faults injected in front of a real S3 server; two concurrent `ttd score`
runs on one store; credentials never in a log line, the store or a report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_corpus, committed_rows, outside_rows, write_simple_tags
from faultproxy import FaultProxy
from safetensors.torch import load_file

from ttd.pipeline.redact import MASK
from ttd.store.sql import query
from ttd.store.store import Store

TTD = [sys.executable, "-m", "ttd.cli.main"]
REL_COLS = ["corpus", "shard", "key", "tag_index", "pixel_raw", "image_raw", "text_raw", "selected"]
MASK_COLS = ["corpus", "shard", "key", "tag_index", "heatmap", "vmin", "vmax"]
TAG_COLS = ["corpus", "shard", "key", "tag_index", "text", "lemma", "pos", "char_start", "char_end"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def sorted_rows(store: str, table: str, cols: list[str]) -> list[tuple]:
    t = Store(store).read(table, columns=cols)
    rows = list(zip(*(t[c].to_pylist() for c in cols)))
    return sorted(rows, key=lambda r: tuple((x is None, x) for x in r))


def committed(store: Path, stage: str) -> int:
    return len(list((store / "manifests" / stage).rglob("*.json"))) if (store / "manifests" / stage).exists() else 0


def seconds_per_shard(store: str, stage: str) -> float:
    """From a finished run's commit times: the work of one shard, start-up excluded."""
    times = sorted(datetime.fromisoformat(m["committed_at"]) for m in Store(store).manifests(stage))
    return (times[-1] - times[0]).total_seconds() / (len(times) - 1)


def run_ok(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", env()), timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_at_random_points(cmd: list[str], progress, total: int, *, kills: int = 10, seed: int = 0,
                          slack_s: float = 0.5, after_kill=None) -> list[tuple[int, float]]:
    """Start `cmd` and SIGKILL it `kills` times, each at a random point: once `progress()` (units of work
    committed, as the store or checkpoint shows them) reaches a random target, plus a random delay of up to
    `slack_s`, so kills land during start-up, inside a unit of work and between units. `after_kill()` runs after
    each kill. Returns the (progress, delay) of every kill."""
    rng = random.Random(seed)
    targets = sorted(rng.randrange(total - 2) for _ in range(kills))  # leave room: a kill must land before the end
    points: list[tuple[int, float]] = []
    while len(points) < kills:
        target = max(targets[len(points)], progress())
        delay = rng.uniform(0, slack_s)
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        at = progress()
        if proc.poll() is not None or at >= total:
            _, stderr = proc.communicate()
            pytest.fail(f"the run reached its end (exit {proc.returncode}) before kill {len(points) + 1}; kills so "
                        f"far {points}; {stderr.decode()[-2000:]}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        points.append((at, round(delay, 3)))
        if after_kill:
            after_kill()
    return points


# ---------------------------------------------------------------- SIGKILL x10 and resume

@pytest.fixture(scope="module")
def corpus12(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    corpus = str(base / "corpus")
    build_corpus(corpus, shards=12, per_shard=12, failed_per_shard=1)
    return base, corpus


SCORE = [*TTD, "score", "--model", "ttd-micro", "--workers", "0"]


@pytest.fixture(scope="module")
def score_reference(corpus12):
    """An uninterrupted `ttd score` of corpus12: the tables every faulted run must reproduce."""
    base, corpus = corpus12
    clean = str(base / "score-clean")
    write_simple_tags(clean, corpus)
    run_ok([*SCORE, "--corpus", corpus, "--store", clean])
    return clean


def tagged_store(corpus12, name: str) -> Path:
    base, corpus = corpus12
    write_simple_tags(str(base / name), corpus)
    return base / name


def same_for_outside_readers(store: Path, stage: str, tables: dict[str, list[str]]):
    """A check that plain DuckDB and Polars over the store's folders see every committed row, and beyond them at
    most the rows of the one shard a kill caught in the moment between moving its files into `tables/` and writing
    its manifest (docs/FORMATS.md; the next run removes or commits them). `check.moments` counts those kills.
    The first column of each table's `cols` must be `shard`."""
    def check(exact: bool = False) -> None:
        manifests = {p.stem.removeprefix("shard=") for p in (store / "manifests" / stage).rglob("*.json")}
        caught = set()
        for table, cols in tables.items():
            want = committed_rows(str(store), table, cols)
            for reader, rows in outside_rows(str(store), table, cols).items():
                missing, extra = sorted(set(want) - set(rows)), sorted(set(rows) - set(want))
                assert not missing and len(rows) == len(set(rows)), (table, reader, missing[:3])
                caught |= {r[0] for r in extra}
        assert len(caught) <= (0 if exact else 1) and not caught & manifests, caught
        check.moments += len(caught)

    check.moments = 0
    return check


@pytest.mark.slow
def test_score_killed_ten_times_resumes_to_the_same_tables(corpus12, score_reference):
    clean, killed = score_reference, tagged_store(corpus12, "score-killed")
    cmd = [*SCORE, "--corpus", corpus12[1]]
    outside = same_for_outside_readers(killed, "score", {"relevancy": ["shard", "key", "tag_index", "pixel_raw"],
                                                         "masks": ["shard", "key", "tag_index"],
                                                         "errors": ["shard", "key"]})
    points = kill_at_random_points([*cmd, "--store", str(killed)], lambda: committed(killed, "score"), 12, seed=1,
                                   slack_s=seconds_per_shard(clean, "score"), after_kill=outside)
    assert len(points) == 10 and len({p for p, _ in points}) > 3  # spread over the run, not one spot
    run_ok([*cmd, "--store", str(killed)])
    outside(exact=True)  # after the next run, exactly the committed rows
    assert not list((killed / "_staging").rglob("*.parquet"))  # and nothing the killed runs staged is left
    for table, cols in (("relevancy", REL_COLS), ("masks", MASK_COLS), ("errors", ["corpus", "shard", "key"])):
        assert sorted_rows(str(killed), table, cols) == sorted_rows(clean, table, cols), table
    keys = sorted_rows(str(killed), "relevancy", ["key", "tag_index"])
    assert len(keys) == len(set(keys)) > 0  # no duplicates
    assert committed(killed, "score") == 12
    assert not list((killed / "claims").rglob("*.json"))  # the killed runs' claims were taken over and released
    again = json.loads(run_ok([*cmd, "--store", str(killed), "--json"]).stdout)
    assert again["done"] == 0 and again["skipped_done"] == 12


@pytest.mark.slow
def test_parse_killed_ten_times_resumes_to_the_same_tables(tmp_path):
    corpus = str(tmp_path / "corpus")
    build_corpus(corpus, shards=12, per_shard=150, failed_per_shard=1)  # about 0.3 s of tagging per shard
    clean, killed = str(tmp_path / "parse-clean"), tmp_path / "parse-killed"
    cmd = [*TTD, "parse", "--corpus", corpus]
    run_ok([*cmd, "--store", clean])
    outside = same_for_outside_readers(killed, "parse", {"tags": ["shard", "key", "tag_index", "text"],
                                                         "captions": ["shard", "key", "caption"],
                                                         "errors": ["shard", "key"]})
    points = kill_at_random_points([*cmd, "--store", str(killed)], lambda: committed(killed, "parse"), 12, seed=2,
                                   slack_s=seconds_per_shard(clean, "parse"), after_kill=outside)
    assert len(points) == 10
    run_ok([*cmd, "--store", str(killed)])
    outside(exact=True)
    assert not list((killed / "_staging").rglob("*.parquet"))
    for table, cols in (("tags", TAG_COLS), ("captions", ["corpus", "shard", "key", "caption"])):
        assert sorted_rows(str(killed), table, cols) == sorted_rows(clean, table, cols), table
    keys = sorted_rows(str(killed), "tags", ["key", "tag_index"])
    assert len(keys) == len(set(keys)) > 0
    assert committed(killed, "parse") == 12


@pytest.mark.slow
def test_distill_killed_ten_times_resumes_to_the_same_weights(tmp_path):
    from ttd.configs import ParseConfig
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score
    from ttd.synth.generate import synthesize

    synthesize(str(tmp_path / "synth"), train=24, eval=0, seed=4)
    corpus, store = str(tmp_path / "synth" / "train"), str(tmp_path / "store")
    run_parse(corpus, store, ParseConfig(tagger=False))
    run_score(corpus, store, model="ttd-micro", workers=0)
    steps = 30
    cfg = tmp_path / "distill.yaml"
    cfg.write_text("batch_size: 4\nwarmup_steps: 2\ncheckpoint_every: 1\nlog_every: 1\nlr: 0.005\n")
    cmd = [*TTD, "distill", "--corpus", corpus, "--store", store, "--model", "ttd-micro", "--steps", str(steps),
           "--seed", "3", "--config", str(cfg), "--device", "cpu"]
    run_ok([*cmd, "--out", str(tmp_path / "straight")])
    resumed = tmp_path / "resumed"

    def checkpointed(folder: Path) -> int:
        try:
            return json.loads((folder / "checkpoint" / "state.json").read_text())["step"] + 1
        except (OSError, ValueError, KeyError):
            return 0

    def step() -> int:  # both rounds (the default refreshes once): kills land in either, and in the re-scoring
        first = resumed / "refresh" / "round-1"
        return (steps if (first / "lora.json").exists() else checkpointed(first)) + checkpointed(resumed)

    points = kill_at_random_points([*cmd, "--out", str(resumed)], step, 2 * steps, seed=3, slack_s=0.2)
    assert len(points) == 10 and len({p for p, _ in points}) > 3 and min(p for p, _ in points) < steps < max(
        p for p, _ in points), points
    summary = json.loads(run_ok([*cmd, "--out", str(resumed), "--json"]).stdout)
    assert summary.get("resumed_from") is not None
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one log row per step of each run (the default's two rounds log as two runs) even across ten kills
    per_run = query(store, "SELECT run, list(step ORDER BY step) AS steps FROM train_log GROUP BY run").to_pylist()
    assert len(per_run) == 2 and all(r["steps"] == list(range(1, steps + 1)) for r in per_run), per_run


# ---------------------------------------------------------------- concurrent runs

@pytest.mark.slow
def test_two_concurrent_score_runs_do_every_shard_once(corpus12, score_reference):
    clean, shared = score_reference, tagged_store(corpus12, "score-shared")
    cmd = [*SCORE, "--corpus", corpus12[1], "--json"]
    procs = [subprocess.Popen([*cmd, "--store", str(shared)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    a, b = (json.loads(o) for o, _ in outs)
    assert a["done"] + b["done"] == 12  # every shard scored exactly once between them
    assert committed(shared, "score") == 12
    for table, cols in (("relevancy", REL_COLS), ("masks", MASK_COLS)):
        assert sorted_rows(str(shared), table, cols) == sorted_rows(clean, table, cols), table
    for f in shared.rglob("*.parquet"):  # no corrupt file, committed or not
        pq.read_table(f)


# ---------------------------------------------------------------- object-store faults

FAULTS = {"throttle": 0.08, "drop": 0.03, "drop_response": 0.03, "cut_response": 0.03, "slow": 0.05}


def _upload(local: Path, s3_uri: str) -> None:
    import s3fs

    s3fs.S3FileSystem().put(str(local) + "/", s3_uri.removeprefix("s3://") + "/", recursive=True)


@pytest.mark.slow
def test_stages_finish_through_object_store_faults(s3_endpoint, s3_bucket, tmp_path):
    """parse and score on an S3 corpus into an S3 store, every request through the fault proxy; meanwhile a
    reader on the fault-free endpoint checks that only whole shards are ever visible to `ttd sql`."""
    local = tmp_path / "corpus"
    build_corpus(str(local), shards=6, per_shard=4, failed_per_shard=1)
    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    _upload(local, corpus)
    clean = str(tmp_path / "clean")
    run_ok([*TTD, "parse", "--corpus", str(local), "--store", clean, "--no-tagger"])
    run_ok([*TTD, "score", "--corpus", str(local), "--store", clean, "--model", "ttd-micro", "--workers", "0"])

    checks, problems = [0, 0], []
    stop = threading.Event()

    def watch() -> None:  # what a user querying during the run sees
        while not stop.is_set():
            try:
                before = {m["shard"]: m["rows"] for m in Store(store).manifests("score")}
                if before:
                    got = query(store, "SELECT shard, count(*) AS n FROM relevancy GROUP BY 1").to_pylist()
                    after = {m["shard"]: m["rows"] for m in Store(store).manifests("score")}
                    seen = {r["shard"]: r["n"] for r in got}
                    if any(seen.get(s, 0) != after[s]["relevancy"] for s in seen) or not set(before) <= set(seen):
                        problems.append((before, seen, after))
                    checks[0] += 1
                    checks[1] += 0 < len(seen) < 6
            except Exception as exc:  # the store may not exist yet
                if "does not exist" not in str(exc) and "not a ttd store" not in str(exc):
                    problems.append(repr(exc))
            time.sleep(0.2)

    with FaultProxy(s3_endpoint, FAULTS, seed=8, slow_s=(0.1, 0.6)) as proxy:
        faulty = env(AWS_ENDPOINT_URL=proxy.endpoint)
        run_ok([*TTD, "parse", "--corpus", corpus, "--store", store, "--no-tagger"], env=faulty)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        summary = json.loads(run_ok([*TTD, "score", "--corpus", corpus, "--store", store, "--model", "ttd-micro",
                                     "--workers", "0", "--json"], env=faulty).stdout)
        stop.set()
        watcher.join()
    assert summary["done"] == 6 and not problems, (summary, problems[:3])
    assert checks[0] > 0
    injected = {k: proxy.counts[k] for k in FaultProxy.KINDS}
    assert all(injected.values()), injected  # every kind of fault happened at least once
    for table, cols in (("tags", TAG_COLS), ("relevancy", REL_COLS), ("masks", MASK_COLS)):
        got = [r[1:] for r in sorted_rows(store, table, cols)]  # corpus names differ (the folder's name)
        assert got == [r[1:] for r in sorted_rows(clean, table, cols)], table


def test_a_shard_whose_claim_the_store_fails_is_reported_and_done_by_the_next_run(s3_endpoint, s3_bucket, tmp_path):
    """S3 answering 500 to every request on one shard's claim (botocore's and s3fs's retries exhausted): that shard
    is a failed shard (exit 1, named), the others are committed, and the next run does it."""
    local = tmp_path / "corpus"
    build_corpus(str(local), shards=3, per_shard=2)
    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    _upload(local, corpus)
    cmd = [*TTD, "parse", "--corpus", corpus, "--store", store, "--no-tagger", "--json"]
    with FaultProxy(s3_endpoint, {}, fail_matching=b"/claims/parse/corpus=corpus/shard=00001.json") as proxy:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(AWS_ENDPOINT_URL=proxy.endpoint),
                              timeout=600)
    assert proc.returncode == 1 and "00001" in proc.stderr, proc.stderr[-2000:]
    assert proxy.counts["failed"] > 0
    assert sorted(m["shard"] for m in Store(store).manifests("parse")) == ["00000", "00002"]
    again = json.loads(run_ok(cmd).stdout)
    assert again["done"] == 1 and again["skipped_done"] == 2, again
    assert sorted(m["shard"] for m in Store(store).manifests("parse")) == ["00000", "00001", "00002"]


# ---------------------------------------------------------------- secrets

KEY_ID, SECRET = "AKIATTDRELIABILITY01", "ttd-reliability-secret-0123456789abcdef"


@pytest.mark.slow
def test_credentials_never_logged_or_written(s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    local = tmp_path / "corpus"
    build_corpus(str(local), shards=2, per_shard=3)
    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    _upload(local, corpus)
    secret_env = env(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SECRET + "-token")
    outputs = []
    for cmd in (["parse", "--corpus", corpus, "--store", store, "--no-tagger"],
                ["score", "--corpus", corpus, "--store", store, "--model", "ttd-micro", "--workers", "0"],
                ["sql", "--store", store, "SELECT count(*) FROM relevancy"],
                ["report", "--store", store, "--out", str(tmp_path / "report"), "--samples", "1"],
                ["sql", "--store", store, "SELECT * FROM read_parquet('s3://elsewhere/x.parquet')"]):
        proc = subprocess.run([*TTD, "-v", *cmd], capture_output=True, text=True, env=secret_env, timeout=600)
        outputs.append(proc.stdout + proc.stderr)
    logged = "\n".join(outputs)
    assert MASK in logged  # the debug log did carry credentials (botocore's signed headers), masked
    fs = s3fs.S3FileSystem()
    stored = b"".join(fs.cat_file(p) for p in fs.find(store.removeprefix("s3://")))
    reports = b"".join(p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file())
    for value in (KEY_ID, SECRET):
        assert value not in logged, "credential in a log line"
        assert value.encode() not in stored, "credential in the store"
        assert value.encode() not in reports, "credential in a report"


# ---------------------------------------------------------------- memory

@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus():
    """benchmarks/memory.py at test size: 10x the samples (same shard size) stays within 1.10x + 32 MiB."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "memory.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=900, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["large"]["shards"] == 10 * result["small"]["shards"]
    assert result["within_bound"] == {"parse": True, "score": True}


# ---------------------------------------------------------------- bad inputs not covered elsewhere

def ttd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TTD, *args], capture_output=True, text=True, env=env(), timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_a_torn_manifest_is_one_clear_line(tmp_path):
    corpus, store = str(tmp_path / "c"), tmp_path / "s"
    build_corpus(corpus, shards=1, per_shard=2)
    write_simple_tags(str(store), corpus)
    manifest = next((store / "manifests" / "parse").rglob("*.json"))
    manifest.write_text('{"stage": "parse", "fing')  # as a disk that filled up mid-write would leave it
    line = one_error_line(ttd_cli("sql", "--store", str(store), "SELECT count(*) FROM tags"))
    assert "is not valid JSON" in line and "delete it to redo that shard" in line


@pytest.mark.parametrize("bad", [
    "[unclosed",  # not YAML
    "- a list\n- not a mapping",
    "corpus: c\nstore: s\nscore: {threshold: 2}",  # out of range
    "corpus: c\nstore: s\nscroe: {}",  # a misspelt section
])
def test_bad_run_configs_are_one_clear_line(tmp_path, bad):
    path = tmp_path / "run.yaml"
    path.write_text(bad)
    one_error_line(ttd_cli("run", "--config", str(path), "--print-config"))


def test_a_checkpoint_naming_a_file_outside_its_folder_is_refused(tmp_path):
    from ttd.errors import TTDError
    from ttd.train.checkpoints import load as load_checkpoint

    weights = {"w": torch.nn.Parameter(torch.zeros(2))}
    opt = torch.optim.AdamW(weights.values())
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, "consumed": 12, "fingerprint": "fp", "params": ["w"],
                                                     "log": [], "tensors": "../../elsewhere.safetensors"}))
    with pytest.raises(TTDError, match="names '../../elsewhere.safetensors'"):
        load_checkpoint(tmp_path, "fp", weights, opt)


def test_a_claim_whose_create_reply_was_lost_is_still_ours(tmp_path, monkeypatch):
    """On S3 a create-if-absent PUT can succeed while its reply is lost; the retried PUT then finds the object and
    fails. The claim found there is this call's own (same owner): the shard is held, not "claimed elsewhere" (which
    left a shard unscored in the S3-faults test above, once in a few runs)."""
    from ttd.store import claims

    store = Store(str(tmp_path / "store"), create=True)
    real = claims._create_exclusive

    def reply_lost(store_, path, data):
        real(store_, path, data)  # the server acted...
        return False  # ...and the client saw 412 on its retry

    monkeypatch.setattr(claims, "_create_exclusive", reply_lost)
    with claims.claim(store, "score", {"corpus": "c", "shard": "00000"}) as holder:
        assert holder is None  # held by us
    assert not list(Path(store.root.path, "claims").rglob("*.json"))  # and released


def test_garbage_and_stale_claims_are_taken_over_live_ones_respected(tmp_path):
    from ttd.store.claims import claim, claim_path

    store = Store(str(tmp_path / "s"), create=True)
    part = {"corpus": "c", "shard": "00000"}
    path = Path(claim_path(store, "score", part))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")  # torn claim
    with claim(store, "score", part) as holder:
        assert holder is None  # taken over
        with claim(store, "score", part) as other:  # a second run now finds it held by a live process
            assert other is not None and other["pid"] == os.getpid()
    assert not path.exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from ttd.store.claims import _MACHINE

    path.write_text(json.dumps({"owner": "x", "machine": _MACHINE, "pid": int(dead.stdout), "heartbeat": time.time(),
                                "ttl": 600}))  # a killed run on this machine: stale at once
    with claim(store, "score", part) as holder:
        assert holder is None
    path.write_text(json.dumps({"owner": "x", "machine": "other-host/boot", "pid": 1, "heartbeat": time.time() - 700,
                                "ttl": 600}))  # another machine, silent for longer than its TTL
    with claim(store, "score", part) as holder:
        assert holder is None
    path.write_text(json.dumps({"owner": "x", "machine": "other-host/boot", "pid": 1, "heartbeat": time.time(),
                                "ttl": 600}))  # another machine, alive
    with claim(store, "score", part) as holder:
        assert holder is not None and holder["machine"] == "other-host/boot"


def test_stale_claims_on_committed_shards_are_cleared(tmp_path):
    """A run killed between its commit and its claim's release leaves a claim that no later run takes over (they
    skip the committed shard); the end of each run clears it, and nothing else."""
    from ttd.store.claims import _MACHINE, claim_path, clear_stale

    store = Store(str(tmp_path / "s"), create=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    docs = {"00000": (dead, True), "00001": (dead, False), "00002": (os.getpid(), True)}  # pid, committed
    for shard, (pid, committed) in docs.items():
        part = {"corpus": "c", "shard": shard}
        path = Path(claim_path(store, "score", part))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"owner": shard, "machine": _MACHINE, "pid": pid, "heartbeat": time.time(),
                                    "ttl": 600}))
        if committed:
            Path(store._manifest_path("score", part)).parent.mkdir(parents=True, exist_ok=True)
            Path(store._manifest_path("score", part)).write_text("{}")
    assert clear_stale(store, "score") == 1
    left = sorted(p.stem for p in (tmp_path / "s" / "claims").rglob("*.json"))
    assert left == ["shard=00001", "shard=00002"]  # a shard still to do keeps it for takeover; a live one stays
    assert clear_stale(store, "parse") == 0  # no claims of that stage at all
