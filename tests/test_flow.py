"""`ttd run` and the Prefect flow end to end through the Prefect engine, on a small TagMask-Synth corpus.

One temporary Prefect server serves the module (prefect_test_harness); results persist under each test's store.
Model: the shipped `ttd-micro` with seeded random weights (deterministic, no download); scoring without Ray.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ttd-prefect-home-"))  # before prefect is imported
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from uuid import UUID  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from ttd.cli.options import overrides_from_flags  # noqa: E402
from ttd.cli.run import run_flags  # noqa: E402
from ttd.errors import TTDError  # noqa: E402
from ttd.pipeline import units as lib  # noqa: E402
from ttd.pipeline.runconfig import RunConfig, load_run_config  # noqa: E402
from ttd.store.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("tags", "captions", "relevancy", "masks", "errors")
SORT = {"tags": ["shard", "key", "tag_index"], "captions": ["shard", "key"], "relevancy": ["shard", "key", "tag_index"],
        "masks": ["shard", "key", "tag_index"], "errors": ["shard", "key", "error_type"]}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server (its own database) for this module; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """TagMask-Synth: 5 train shards of 8 samples at 64 px, and a 12-sample eval set."""
    from ttd.synth.generate import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(str(out), train=40, eval=12, seed=3, config=SynthConfig(shard_size=8, image_size=64,
                                                                        n_thing_classes=20))
    shards = sorted(p.name.removesuffix(".tar") for p in (out / "train").glob("*.tar"))
    assert shards == ["00000", "00001", "00002", "00003", "00004"]
    return out


def add_shards(synth: Path, corpus: Path, names: list[str], *, stats: bool = True) -> None:
    """Copy shards of the synth corpus into `corpus` as if img2dataset had just written them (mtime kept)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".tar", ".parquet") + (("_stats.json",) if stats else ()):
            shutil.copy2(synth / "train" / f"{name}{suffix}", corpus / f"{name}{suffix}")


def make_config(tmp: Path, *, evaluate: Path | None = None, batch: int = 2, **flow) -> RunConfig:
    doc = {"name": "test", "corpus": str(tmp / "corpus"), "store": str(tmp / "store"),
           "model": {"name": "ttd-micro"}, "parse": {"tagger": False}, "ray": {"workers": 0},
           "flow": {"shards_per_batch": batch, "retries": 2, "retry_delay_seconds": 0, **flow}}
    if evaluate is not None:
        doc["evaluate"] = {"root": str(evaluate)}
    return RunConfig.model_validate(doc)


def run(cfg: RunConfig) -> dict:
    from flows.pipeline import run_pipeline

    return run_pipeline(cfg)


def store_files(store: str) -> dict[str, int]:
    """Every data file and manifest of the store with its modification time (ns); the Prefect results excluded."""
    root = Path(store)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "_prefect" not in p.parts}


def task_states(flow_run_id: str) -> dict[str, str]:
    """Task-run name -> state name, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:  # task states reach the API asynchronously: wait until none is still in flight
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return {r.name: r.state.name for r in runs}
            time.sleep(0.5)


def table_rows(store: str, table: str) -> list[dict]:
    t = Store(store).read(table)
    return t.sort_by([(c, "ascending") for c in SORT[table]]).to_pylist()


@pytest.fixture(scope="module")
def first_run(prefect_api, synth, tmp_path_factory):
    """An uninterrupted run of every stage over the 5 shards (3 batches), with evaluation: the reference."""
    tmp = tmp_path_factory.mktemp("reference")
    add_shards(synth, tmp / "corpus", ["00000", "00001", "00002", "00003", "00004"])
    cfg = make_config(tmp, evaluate=synth / "eval")
    summary = run(cfg)
    return cfg, summary


# ---------------------------------------------------------------- the flow

def test_flow_runs_every_stage_and_a_second_run_does_nothing(first_run):
    cfg, first = first_run
    st = first["stages"]
    assert [s for s in st] == ["parse", "score", "evaluate"]
    assert st["parse"]["status"] == st["score"]["status"] == st["evaluate"]["status"] == "done"
    assert st["parse"]["batches"] == st["score"]["batches"] == 3
    assert st["parse"]["shards_processed"] == st["score"]["shards_processed"] == 5
    store = Store(cfg.store)
    assert len(store.manifests("parse")) == len(store.manifests("score")) == 5
    tags = store.read("tags").num_rows
    assert tags > 0 and store.read("relevancy").num_rows == tags
    assert {r["method"] for r in store.read("metrics").to_pylist()} >= {"pixel", "image", "text", "noun", "caption"}
    assert list((Path(cfg.store) / "_prefect" / "results").iterdir())  # results persist under the store
    before = store_files(cfg.store)

    second = run(cfg)
    # every stage reports done work, the store is untouched, and every unit of work was restored from the cache
    assert second["all_done_before"] is True
    assert {k: v["status"] for k, v in second["stages"].items()} == dict.fromkeys(st, "already done")
    assert second["stages"]["parse"]["shards_processed"] == second["stages"]["score"]["shards_processed"] == 0
    assert store_files(cfg.store) == before
    states = task_states(second["flow_run_id"])
    work = {name: s for name, s in states.items() if name.startswith(("parse-", "score-", "evaluate-"))}
    assert sorted(work) == ["evaluate-base", "parse-00000-00001", "parse-00002-00003", "parse-00004",
                            "score-00000-00001", "score-00002-00003", "score-00004"]
    assert set(work.values()) == {"Cached"}
    assert set(task_states(first["flow_run_id"]).values()) == {"Completed"}
    # a small fraction of the first run's time (the first parses, scores and evaluates; the second only plans)
    assert second["seconds"] < 0.5 * first["seconds"], (first["seconds"], second["seconds"])


def test_new_shards_are_the_only_work_of_the_next_run(prefect_api, synth, tmp_path):
    cfg = make_config(tmp_path)
    corpus = tmp_path / "corpus"
    add_shards(synth, corpus, ["00000", "00001", "00002"])
    first = run(cfg)
    assert first["stages"]["score"]["shards_processed"] == 3
    before = store_files(cfg.store)

    # shard 3 arrives complete; shard 4 is still downloading (no _stats.json): it waits
    add_shards(synth, corpus, ["00003"])
    add_shards(synth, corpus, ["00004"], stats=False)
    second = run(cfg)
    for stage in ("parse", "score"):
        report = second["stages"][stage]
        assert report["status"] == "done"
        assert report["shards_processed"] == 1 and report["waiting"] == ["00004"]
        by_batch = {tuple(o["batch"]["shards"]): (o["state"], o["processed"], o["skipped"])
                    for o in report["outcomes"]}
        # batch 0 is restored from the cache; batch 1 gained shard 3 (shard 2 in it is skipped by its manifest)
        assert by_batch == {("00000", "00001"): ("Cached", 0, 2), ("00002", "00003"): ("Completed", 1, 1)}
    after = store_files(cfg.store)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of shards 0-2 was rewritten
    new = [k for k in set(after) - set(before) if not k.startswith("corpora")]
    assert new and all("shard=00003" in k for k in new), new
    assert sorted(m["shard"] for m in Store(cfg.store).manifests("score")) == ["00000", "00001", "00002", "00003"]

    # its _stats.json lands: the next run processes shard 4 and nothing else
    shutil.copy2(synth / "train" / "00004_stats.json", corpus / "00004_stats.json")
    third = run(cfg)
    for stage in ("parse", "score"):
        report = third["stages"][stage]
        assert report["shards_processed"] == 1 and report["waiting"] == []
        assert [o["state"] for o in report["outcomes"]] == ["Cached", "Cached", "Completed"]


def test_credentials_are_masked_in_prefect_logs(prefect_api, synth, tmp_path, monkeypatch):
    """A credential in a logged value (here the corpus path) is masked by Prefect's own handlers too: in the logs
    the Prefect server stores, and in what its console handler writes (its format adds the flow run's name)."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    secret = "Zq9distinctiveSecretValue"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = make_config(tmp_path)
    cfg.corpus = str(tmp_path / f"corpus-{secret}")
    add_shards(synth, Path(cfg.corpus), ["00000"])
    summary = run(cfg)
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:  # logs reach the server in batches
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[UUID(summary["flow_run_id"])])))
            if any("corpus-***" in entry.message for entry in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert logs and not any(secret in entry.message for entry in logs)
    assert any("corpus-***" in entry.message for entry in logs)
    handlers = [h for name in ("prefect", "prefect.flow_runs") for h in logging.getLogger(name).handlers]
    assert handlers
    for handler in handlers:
        record = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "reading %s", (cfg.corpus,),
                                   None)
        record.flow_run_name, record.flow_run_id = f"run-{secret}", summary["flow_run_id"]
        for f in handler.filters:
            f.filter(record)
        assert secret not in handler.format(record) and "***" in handler.format(record)


@pytest.mark.slow
def test_a_flow_killed_mid_stage_resumes_to_the_same_tables(first_run, synth, tmp_path, prefect_api):
    """SIGKILL the flow's process after its first score commit; the re-run completes with the reference tables."""
    reference, _ = first_run
    cfg = make_config(tmp_path, batch=1, stages=["parse", "score"])
    add_shards(synth, tmp_path / "corpus", ["00000", "00001", "00002", "00003", "00004"])
    script = tmp_path / "slow_flow.py"
    script.write_text(
        "import json, sys, time\n"
        "from ttd.store.store import Store\n"
        "real = Store.commit\n"
        "def commit(self, stage, *a, **k):\n"
        "    doc = real(self, stage, *a, **k)\n"
        "    if stage == 'score':\n"
        "        time.sleep(600)  # killed here: one score shard committed, its batch task still running\n"
        "    return doc\n"
        "Store.commit = commit\n"
        "from flows.pipeline import run_pipeline\n"
        "run_pipeline(json.loads(sys.argv[1]))\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg.model_dump(mode="json"))], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifests = Path(cfg.store) / "manifests" / "score"
    deadline = time.monotonic() + 300
    try:
        while not (manifests.exists() and list(manifests.rglob("*.json"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the flow never committed a score shard"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert len(Store(cfg.store).manifests("parse")) == 5 and len(Store(cfg.store).manifests("score")) == 1

    resumed = run(cfg)
    parse, score = resumed["stages"]["parse"], resumed["stages"]["score"]
    assert parse["status"] == "already done" and parse["cached_batches"] == 5  # parse finished before the kill
    assert score["shards_processed"] == 4 and score["shards_already_done"] == 1
    for table in TABLES:
        assert table_rows(cfg.store, table) == table_rows(reference.store, table), table
    fps = {(m["stage"], m["shard"]): m["fingerprint"] for m in Store(cfg.store).manifests() if m["stage"] in
           ("parse", "score")}
    assert fps == {(m["stage"], m["shard"]): m["fingerprint"] for m in Store(reference.store).manifests()
                   if m["stage"] in ("parse", "score")}


def test_a_failed_stage_fails_the_flow_and_transient_errors_are_retried(prefect_api, synth, tmp_path, monkeypatch):
    from flows.pipeline import run_pipeline

    cfg = make_config(tmp_path)
    add_shards(synth, tmp_path / "corpus", ["00000", "00001"])
    real = lib.run_score_batch
    calls = {"n": 0}

    def flaky(cfg, shards):  # an S3 hiccup, then fine
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("SlowDown: please reduce your request rate")
        return real(cfg, shards)

    monkeypatch.setattr(lib, "run_score_batch", flaky)
    summary = run(cfg)
    assert calls["n"] == 2 and summary["stages"]["score"]["status"] == "done"

    def broken(cfg, shards):
        calls["n"] += 1
        raise ValueError("a bug")

    calls["n"] = 0
    monkeypatch.setattr(lib, "run_score_batch", broken)
    state = run_pipeline(cfg.model_copy(update={"flow": cfg.flow.model_copy(update={"refresh_cache": True})}),
                         return_state=True)
    assert state.is_failed()  # a failed task alone would leave a Prefect 3 flow Completed
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, lib.StageFailed) and exc.stage == "score" and not exc.user_error
    assert "ValueError: a bug" in str(exc) and "re-run to resume" in str(exc)
    assert calls["n"] == 1  # not transient: no retry


def test_flow_with_the_store_and_its_cache_on_s3(prefect_api, synth, tmp_path, s3_bucket):
    cfg = make_config(tmp_path, batch=1).model_copy(update={"store": f"{s3_bucket}/store"})
    add_shards(synth, tmp_path / "corpus", ["00000", "00001"])
    first = run(cfg)
    assert first["stages"]["score"]["shards_processed"] == 2
    second = run(cfg)
    assert second["all_done_before"] and second["stages"]["score"]["cached_batches"] == 2
    import s3fs

    results = s3fs.S3FileSystem().find(f"{s3_bucket}/store/_prefect/results")
    assert len(results) == 4  # 2 parse + 2 score batches


# ---------------------------------------------------------------- `ttd run` on the command line

def test_ttd_run_twice_reports_every_stage_done(prefect_api, synth, tmp_path):
    from typer.testing import CliRunner

    from ttd.cli.main import app

    add_shards(synth, tmp_path / "corpus", ["00000", "00001"])
    cfg = make_config(tmp_path).model_dump(mode="json", exclude_defaults=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    first = runner.invoke(app, ["run", "--config", str(path), "--json", "--score-threshold", "0.6"])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc["stages"]["score"]["status"] == "done" and not doc["all_done_before"]
    assert {round(t, 4) for t in Store(str(tmp_path / "store")).read("relevancy")["threshold"].to_pylist()} == {0.6}
    second = runner.invoke(app, ["run", "--config", str(path), "--score-threshold", "0.6"])
    assert second.exit_code == 0, second.output
    assert "every stage was already done" in second.output
    assert second.stdout.count("already done") >= 2  # the table: parse and score rows


def test_ttd_run_flags_and_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from ttd.cli.main import app

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"corpus": "c", "store": "s", "parse": {"policy": "content"}}))
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--config", str(path), "--print-config", "--score-threshold", "0.7",
                              "--no-parse-tagger", "--flow-stages", "[parse, score]", "--pretrained", "base",
                              "--synth-out", "syn"])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    assert doc["score"]["threshold"] == 0.7 and doc["parse"] == {**doc["parse"], "policy": "content",
                                                                 "tagger": False}
    assert doc["flow"]["stages"] == ["parse", "score"] and doc["model"]["pretrained"] == "base"
    assert doc["corpus"] == "c" and doc["synth"]["out"] == "syn"
    res = runner.invoke(app, ["run", "--config", str(path), "--print-config", "--score-threshold", "2"])
    assert isinstance(res.exception, TTDError) and "score.threshold" in str(res.exception)
    path.write_text(yaml.safe_dump({"corpus": "c", "store": "s", "sccore": {}}))
    with pytest.raises(TTDError, match="sccore"):
        load_run_config(path)


# ---------------------------------------------------------------- config, planning and failure rules

def test_every_setting_is_a_flag():
    specs = run_flags()
    flags = [s.flag for s in specs]
    assert len(flags) == len(set(flags))
    paths = {s.path for s in specs}
    for path in [("corpus",), ("store",), ("model", "pretrained"), ("score", "threshold"), ("parse", "policy"),
                 ("synth", "config", "image_size"), ("synth", "config", "train_style"), ("ray", "address"),
                 ("pretrain", "config", "steps"), ("evaluate", "root"), ("distill", "enabled"),
                 ("flow", "shards_per_batch"), ("flow", "result_storage")]:
        assert path in paths, path
    assert overrides_from_flags({("score", "threshold"): 0.6, ("corpus",): None, ("flow", "stages"): ["parse"]}) \
        == {"score": {"threshold": 0.6}, "flow": {"stages": ["parse"]}}


@pytest.mark.parametrize("name", ["demo.yaml", "cc3m-gpu-s3.yaml"])
def test_example_configs_are_valid(name):
    cfg = load_run_config(ROOT / "configs" / name)
    if name == "demo.yaml":
        assert cfg.corpus == "out/demo/synth/train" and cfg.model.pretrained is None  # the embedded base model
        assert cfg.stages() == ["synth", "parse", "score", "distill", "evaluate"]
        assert cfg.evaluate.root == "out/demo/synth/eval" and cfg.distill.out == "out/demo/ttd-lora"
    else:
        assert cfg.store.startswith("s3://") and cfg.model.name == "ViT-B-16" and cfg.ray.address == "auto"
        assert cfg.stages() == ["parse", "score", "distill", "evaluate"]


def _planned(members):
    """PlannedShards from (name, fingerprint or None while waiting, done)."""
    from ttd.corpus import ShardRef
    from ttd.stages.engine import PlannedShard

    return [PlannedShard(ShardRef("c", name, (f"{name}.tar",), fp is not None, f"in-{name}"),
                         "waiting" if fp is None else "done" if done else "todo", fp, f"in-{name}")
            for name, fp, done in members]


def test_batches_keep_their_members_and_keys_follow_fingerprints():
    members = [("a", "fa", True), ("b", "fb", True), ("c", "fc", False), ("d", None, False)]
    batches = lib.make_batches("score", "s3://b/store", _planned(members), 2)
    assert [(b.shards, b.waiting, b.done) for b in batches] == [(["a", "b"], [], True), (["c"], ["d"], False)]
    # a batch carries its runnable members as planned, and they survive a trip through JSON (a task parameter)
    from ttd.stages.engine import PlannedShard

    carried = [PlannedShard.from_dict(json.loads(json.dumps(p))) for p in batches[1].planned]
    assert carried == _planned(members)[2:3]
    again = lib.make_batches("score", "s3://b/store",
                             _planned([*members[:3], ("d", "fd", False), ("e", "fe", False)]), 2)
    assert again[0].key == batches[0].key and again[1].key != batches[1].key and len(again) == 3
    assert lib.make_batches("score", "s3://b/other", _planned(members), 2)[0].key != batches[0].key
    assert lib.make_batches("parse", "s3://b/store", _planned(members), 2)[0].key != batches[0].key
    changed = lib.make_batches("score", "s3://b/store", _planned([("a", "fa2", True), *members[1:]]), 2)
    assert changed[0].key != batches[0].key


def test_settings_that_make_a_schedule_recompute_are_named(tmp_path):
    nightly = make_config(tmp_path).model_copy(update={"flow": make_config(tmp_path).flow.model_copy(
        update={"stages": ["parse", "score"]})})
    same = make_config(tmp_path)
    assert lib.recompute_changes(nightly, same) == []
    doc = make_config(tmp_path).model_dump(mode="json")
    faster = RunConfig.model_validate({**doc, "score": {**doc["score"], "batch_size": 7, "decode_threads": 1}})
    assert lib.recompute_changes(nightly, faster) == []  # speed settings never change a fingerprint
    stricter = RunConfig.model_validate({**doc, "score": {**doc["score"], "threshold": 0.6}})
    assert lib.recompute_changes(nightly, stricter) == ["score.threshold: 0.4 -> 0.6"]
    assert lib.recompute_changes(nightly, stricter.model_copy(update={"store": str(tmp_path / "other")})) == []
    assert lib.recompute_changes(nightly, stricter.model_copy(update={"corpus_name": "another"})) == []
    parse_only = RunConfig.model_validate({**doc, "score": {**doc["score"], "threshold": 0.6},
                                           "flow": {**doc["flow"], "stages": ["parse"]}})
    assert lib.recompute_changes(nightly, parse_only) == []  # it does not score: the threshold is not its business
    tagged = RunConfig.model_validate({**doc, "parse": {**doc["parse"], "tagger": True}})
    assert lib.recompute_changes(nightly, tagged) == ["parse.tagger: False -> True"]


def test_run_summary_markdown_has_the_stage_table():
    outcomes = [{"batch": {"shards": ["00000", "00001"]}, "state": "Cached", "result": None},
                {"batch": {"shards": ["00002", "00003"]}, "state": "Completed",
                 "result": {"done": 2, "skipped_done": 0, "images": 16, "errors": 1}}]
    report = lib.stage_report("score", outcomes, 4.0, waiting=["00004"])
    assert (report["shards_processed"], report["shards_already_done"], report["errors"], report["items_per_s"]) == \
        (2, 2, 1, 4.0)
    summary = {"name": "local", "deployment": "nightly-new-shards", "corpus": "/data/c", "store": "/data/s",
               "model_id": "m", "status": "done", "seconds": 9.5, "stages": {"score": report},
               "warnings": ["this run's settings differ"]}
    text = lib.run_markdown(summary)
    assert "| score | done | 2 | 2 | 1 | 1 | 4.0 images/s | 4.0 |" in text
    assert "- warning: this run's settings differ" in text and "00004" in text


def test_only_transient_failures_are_retried():
    from ray.exceptions import ActorDiedError

    assert lib.is_transient(OSError("connection reset"))
    assert lib.is_transient(TimeoutError())
    assert lib.is_transient(ActorDiedError())
    assert lib.is_transient(lib.ShardsFailed("parse", [{"shard": "00001", "error": "OSError: truncated"}]))
    assert not lib.is_transient(TTDError("unknown model 'ViT-X'"))
    assert not lib.is_transient(PermissionError("access denied"))
    assert not lib.is_transient(ValueError("a bug"))
    failed = lib.StageFailed("score", [TTDError("unknown model 'ViT-X': use ...")])
    assert failed.user_error and str(failed) == "stage score failed: unknown model 'ViT-X': use ..."


def test_stage_shard_filters(synth, tmp_path):
    """run_parse / run_score on a batch: only the named shards run; an unknown name is one clear line."""
    from ttd.configs import ParseConfig
    from ttd.stages.parse import run_parse
    from ttd.stages.score import run_score

    corpus, store = tmp_path / "corpus", str(tmp_path / "store")
    add_shards(synth, corpus, ["00000", "00001", "00002"])
    summary = run_parse(str(corpus), store, ParseConfig(tagger=False), shards=["00001"])
    assert summary["shards"] == 1 and summary["done"] == 1
    assert [m["shard"] for m in Store(store).manifests("parse")] == ["00001"]
    scored = run_score(str(corpus), store, model="ttd-micro", workers=0, shards=["00001", "00002"])
    assert scored["done"] == 1 and scored["unparsed"] == ["00002"]
    with pytest.raises(TTDError, match="no shard"):
        run_parse(str(corpus), store, ParseConfig(tagger=False), shards=["00009"])
