import io
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import build_corpus, free_port, jpeg, ray_node, write_simple_tags
from PIL import Image

from ttd.configs import ScoreConfig
from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.stages.engine import SHARDS_PER_CALL
from ttd.stages.score import run_score
from ttd.store.sql import query
from ttd.store.store import Store
from ttd.store.uri import resolve

MODEL = "ttd-micro"


def rows(store, table, cols):
    t = Store(store).read(table, columns=cols).sort_by([(c, "ascending") for c in cols[:2]])
    return t.to_pylist()


def scored(tmp_path, **kw):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=2, per_shard=6)
    write_simple_tags(store, corpus)
    return corpus, store, run_score(corpus, store, model=MODEL, workers=0, **kw)


def test_score_fills_relevancy_and_masks_and_is_incremental(tmp_path):
    corpus, store, first = scored(tmp_path)
    assert first["done"] == 2 and first["images"] == 12 and first["errors"] == 0
    n_tags = Store(store).read("tags").num_rows
    rel = Store(store).read("relevancy")
    assert rel.num_rows == n_tags
    sel = sum(rel["selected"].to_pylist())
    assert Store(store).read("masks").num_rows == sel > 0
    # scores normalised per caption: every caption has a best tag at 1 and a worst at 0
    per_caption = query(store, "SELECT key, max(pixel_score) AS hi, min(pixel_score) AS lo FROM relevancy "
                               "GROUP BY key").to_pylist()
    assert all(r["hi"] == pytest.approx(1.0) and r["lo"] == pytest.approx(0.0) for r in per_caption)
    masks = Store(store).read("masks").to_pylist()
    assert all(len(m["heatmap"]) == m["height"] * m["width"] == 64 for m in masks)
    again = run_score(corpus, store, model=MODEL, workers=0)
    assert again["done"] == 0 and again["skipped_done"] == 2
    # a new threshold re-scores; batch size (speed only) does not
    same = run_score(corpus, store, ScoreConfig(batch_size=3), model=MODEL, workers=0)
    assert same["done"] == 0
    changed = run_score(corpus, store, ScoreConfig(threshold=0.9), model=MODEL, workers=0)
    assert changed["done"] == 2
    assert {round(t, 4) for t in Store(store).read("relevancy")["threshold"].to_pylist()} == {0.9}


def test_a_run_with_nothing_to_do_loads_no_model(tmp_path, monkeypatch):
    import ttd.stages.score

    corpus, store, _ = scored(tmp_path)
    loads = []
    real = ttd.stages.score.load_model
    monkeypatch.setattr(ttd.stages.score, "load_model", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    again = run_score(corpus, store, model=MODEL, workers=0)
    assert again["skipped_done"] == 2 and loads == []  # planned from the model's identity alone
    changed = run_score(corpus, store, ScoreConfig(threshold=0.7), model=MODEL, workers=0)
    assert changed["done"] == 2 and len(loads) == 1


def test_acceptance_queries(tmp_path):
    _, store, _ = scored(tmp_path)
    top = query(store, "SELECT text, count(*) AS n FROM relevancy WHERE selected GROUP BY 1 ORDER BY 2 DESC, 1 "
                       "LIMIT 5").to_pylist()
    assert top and all(r["n"] >= 1 for r in top)
    stop = query(store, "SELECT avg(r.selected::INT) AS rate FROM relevancy r JOIN tags t USING (corpus, shard, key, "
                        "tag_index) WHERE t.is_stop").to_pylist()[0]["rate"]
    assert 0.0 <= stop <= 1.0


def test_tag_embeddings_are_computed_once_per_tag(tmp_path):
    corpus, store, _ = scored(tmp_path)
    emb = Store(store).read("tag_embeddings")
    distinct = set(Store(store).read("tags")["lower"].to_pylist())
    assert sorted(emb["tag"].to_pylist()) == sorted(distinct)  # shard 2 reused shard 1's embeddings


def test_same_rows_after_a_killed_run(tmp_path, monkeypatch):
    corpus, clean, _ = scored(tmp_path)
    killed = str(tmp_path / "killed")
    write_simple_tags(killed, corpus)
    real = Store.commit
    calls = {"n": 0}

    def die_on_second_score_commit(self, stage, *a, **kw):
        if stage == "score":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed")
        return real(self, stage, *a, **kw)

    monkeypatch.setattr(Store, "commit", die_on_second_score_commit)
    with pytest.raises(KeyboardInterrupt):
        run_score(corpus, killed, model=MODEL, workers=0)
    monkeypatch.setattr(Store, "commit", real)
    resumed = run_score(corpus, killed, model=MODEL, workers=0)
    assert resumed["done"] == 1 and resumed["skipped_done"] == 1
    cols = ["key", "tag_index", "pixel_raw", "selected"]
    assert rows(killed, "relevancy", cols) == rows(clean, "relevancy", cols)
    assert rows(killed, "masks", ["key", "tag_index", "heatmap"]) == rows(clean, "masks", ["key", "tag_index",
                                                                                           "heatmap"])


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is tiny (a decompression-bomb shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + \
        chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("processes,decoder", [(0, "pil"), (2, "pil"), (0, "device"), (2, "device")],
                         ids=["threads", "processes", "device", "device-processes"])
def test_bad_images_become_errors_and_the_rest_is_scored(tmp_path, processes, decoder):
    """The same errors rows whether images are decoded in threads, in forked processes, or (JPEGs) by the device's
    decoder with PIL taking what it refuses (CMYK, PNG, the truncated JPEG whose header reads well)."""
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    w = ShardWriter(resolve(corpus), 0)
    rng = np.random.default_rng(0)
    cases = {
        "good": jpeg(1),
        "corrupt": jpeg(2)[:300],
        "tiny": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "bomb": png_declaring(20000, 20000),
        "cmyk": encoded(Image.new("CMYK", (40, 30), (10, 200, 30, 0)), "JPEG"),
        "sixteen": encoded(Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)), "PNG"),
        "alpha": encoded(Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG"),
        "nocaption": jpeg(3),
    }
    keys = {}
    for i, (name, data) in enumerate(cases.items()):
        keys[name] = make_key(0, i)
        w.add(keys[name], "" if name == "nocaption" else f"a {name} picture", data, width=32, height=32)
    w.close()
    write_simple_tags(store, corpus)
    summary = run_score(corpus, store, ScoreConfig(max_pixels=50_000_000, decode_processes=processes,
                                                   decoder=decoder), model=MODEL, workers=0)
    errs = {r["key"]: r["error_type"] for r in Store(store).read("errors").to_pylist()}
    assert errs == {keys["corrupt"]: "corrupt_image", keys["bomb"]: "decompression_bomb",
                    keys["nocaption"]: "no_candidates"}
    scored_keys = set(Store(store).read("relevancy")["key"].to_pylist())
    assert scored_keys == {keys[n] for n in ("good", "tiny", "cmyk", "sixteen", "alpha")}
    assert summary["images"] == 5


def test_long_tag_is_scored_not_fatal(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    w = ShardWriter(resolve(corpus), 0)
    w.add(make_key(0, 0), "a " + "supercalifragilistic" * 30 + " dog", jpeg(0), width=32, height=32)
    w.close()
    write_simple_tags(store, corpus)
    run_score(corpus, store, model=MODEL, workers=0)
    assert Store(store).read("relevancy").num_rows == 3


def _head(*resources: str):
    """A head node on a free port; yields (address, pid) once a driver can join it and it offers its CPUs."""
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    with ray_node("--head", f"--port={port}", "--include-dashboard=false", *resources) as head:
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                    if ray.cluster_resources().get("CPU"):
                        break
                except Exception:
                    if time.monotonic() > deadline or head.poll() is not None:
                        raise
                finally:
                    ray.shutdown()
                time.sleep(1)
            yield address, head.pid
        finally:
            ray.shutdown()


@pytest.fixture
def ray_head():
    yield from _head("--num-cpus=2")


@pytest.fixture
def ray_gpu_head():
    """A head whose one GPU is declared, not real: Ray schedules GPU actors on it, which find no CUDA and score on
    the CPU; what is tested is how many actors the pool holds, not where they compute."""
    yield from _head("--num-cpus=2", "--num-gpus=1")


def _session_processes(sid: int, title: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(f[0]) for f in (line.split(None, 2) for line in out.splitlines())
            if len(f) == 3 and int(f[1]) == sid and f[2].startswith(title)]


@pytest.mark.slow
def test_ray_path_against_a_real_local_cluster(tmp_path, ray_head):
    """The stage joins a running Ray cluster by address; its tables equal a local run's."""
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=3, per_shard=4)
    write_simple_tags(store, corpus)
    stats = Path(corpus, "00002_stats.json")
    stats.rename(stats.with_suffix(".held"))  # the last shard is still "downloading": the next call gets it
    first = run_score(corpus, store, model=MODEL, ray_address=ray_head[0], workers=2)
    assert first["done"] == 2 and first["workers"] == 2 and first["waiting"] == ["00002"]
    import ray

    from ttd.stages import engine as score_ray

    pids = ray.get([a.alive.remote() for a in score_ray._ACTORS["actors"]])
    stats.with_suffix(".held").rename(stats)
    second = run_score(corpus, store, model=MODEL, ray_address=ray_head[0], workers=2)
    assert second["done"] == 1 and second["skipped_done"] == 2
    # the same actors, models loaded once: a flow's next batch does not start and load them again
    assert ray.get([a.alive.remote() for a in score_ray._ACTORS["actors"]])[:1] == pids[:1]
    summary = {"images": first["images"] + second["images"]}
    assert summary["images"] == 12
    local = str(tmp_path / "local")
    write_simple_tags(local, corpus)
    run_score(corpus, local, model=MODEL, workers=0)
    cols = ["key", "tag_index", "pixel_raw", "selected"]
    ray_rows, local_rows = rows(store, "relevancy", cols), rows(local, "relevancy", cols)
    assert [(r["key"], r["tag_index"], r["selected"]) for r in ray_rows] == \
        [(r["key"], r["tag_index"], r["selected"]) for r in local_rows]
    np.testing.assert_allclose([r["pixel_raw"] for r in ray_rows], [r["pixel_raw"] for r in local_rows], atol=1e-5)


@pytest.mark.slow
def test_a_lost_ray_actor_is_restarted_and_its_shard_retried(tmp_path, ray_head):
    """SIGKILL the scoring actor's process once the first shard is committed (a preempted worker): Ray restarts it,
    the shard it held is retried (its claim, of a dead process, is taken over) and the run completes."""
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    shards = 8
    build_corpus(corpus, shards=shards, per_shard=8)
    write_simple_tags(store, corpus)
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(
        run_score(corpus, store, model=MODEL, ray_address=ray_head[0], workers=1)))
    run.start()
    manifests = Path(store, "manifests", "score")
    killed_at = None
    deadline = time.monotonic() + 300
    while run.is_alive() and killed_at is None and time.monotonic() < deadline:
        done = len(list(manifests.rglob("*.json"))) if manifests.exists() else 0
        actors = _session_processes(ray_head[1], "ray::RayStageWorker")
        if done >= 1 and actors:
            for pid in actors:
                os.kill(pid, signal.SIGKILL)
            killed_at = done
        time.sleep(0.02)
    run.join(300)
    assert killed_at is not None and killed_at < shards, "the actor was not killed mid-run"
    # an actor gets SHARDS_PER_CALL shards at a time: the retried call skips, as done, those it committed before
    # the kill, and scores the rest; every shard is counted once
    assert result["done"] + result["skipped_done"] == shards and result["skipped_done"] <= SHARDS_PER_CALL
    assert len(list(manifests.rglob("*.json"))) == shards
    keys = [(r["key"], r["tag_index"]) for r in rows(store, "relevancy", ["key", "tag_index"])]
    tags = [(r["key"], r["tag_index"]) for r in rows(store, "tags", ["key", "tag_index"])]
    assert len(keys) == len(set(keys)) and set(keys) == set(tags)  # every candidate scored once
    assert not list(Path(store, "claims").rglob("*.json"))


def test_pipelined_and_serial_scoring_write_the_same_bytes(tmp_path):
    """The two schedules run the same steps: relevancy, masks and errors equal row for row, heatmaps byte for byte,
    on a corpus with failed downloads and a batch size that splits shards unevenly."""
    corpus = str(tmp_path / "c")
    build_corpus(corpus, shards=3, per_shard=7)
    tables = {}
    for name, settings in (("serial", {"pipelined": False}), ("pipelined", {}),
                           ("processes", {"decode_processes": 2})):
        store = str(tmp_path / f"s-{name}")
        write_simple_tags(store, corpus)
        summary = run_score(corpus, store, ScoreConfig(batch_size=3, **settings), model=MODEL, workers=0)
        assert summary["done"] == 3 and summary["images"] == 21
        s = Store(store)
        tables[name] = {t: s.read(t).drop_columns(["corpus"]).sort_by(
            [("shard", "ascending"), ("key", "ascending")] + ([("tag_index", "ascending")] if t != "errors" else []))
            for t in ("relevancy", "masks", "errors")}
    for t in ("relevancy", "masks", "errors"):
        assert tables["serial"][t].equals(tables["pipelined"][t]), t
        assert tables["serial"][t].equals(tables["processes"][t]), t  # decoded in forked children: same bytes
    # the speed setting is not part of the fingerprint: a pipelined re-run over the serial store does nothing
    again = run_score(corpus, str(tmp_path / "s-serial"), ScoreConfig(batch_size=3, decode_processes=2), model=MODEL,
                      workers=0)
    assert again["done"] == 0 and again["skipped_done"] == 3


def test_the_device_step_keeps_every_tensor_on_the_models_device(tmp_path):
    """What crashed the first CUDA batch (caption embeddings made on the CPU met CUDA image features), caught on a
    CPU: the scorer's device step runs with the model on the `meta` device, where any tensor created elsewhere
    fails to combine. Every output is on the model's device, until the one copy back per batch."""
    import torch

    from ttd.corpus import open_corpus
    from ttd.stages import score_pipeline
    from ttd.stages.engine import plan
    from ttd.stages.score import ShardScorer, stage_spec

    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=1, per_shard=4)
    write_simple_tags(store, corpus)
    scorer = ShardScorer({"uri": corpus, "format": "webdataset", "name": "c"}, store, {"name": MODEL},
                         ScoreConfig(batch_size=4).model_dump(mode="json"), "cpu")
    (planned,) = plan(open_corpus(corpus), Store(store), stage_spec(scorer.config, scorer.model_id))
    job = score_pipeline.ShardJob(planned.shard, planned.fingerprint, planned.input_fingerprint)
    reads = score_pipeline.read_batches([job], scorer._open, scorer.decoder, 4, False, score_pipeline.Timings())
    batch = next(reads)
    scorer._tag_embeddings(job.shard, job.candidates.vocabulary())  # the cache, filled on the CPU
    meta = torch.device("meta")
    scorer.bundle.model.to(meta)
    scorer.bundle.device = scorer.device = meta
    scorer.prep = score_pipeline.ImagePrep(scorer.bundle.preprocess, meta)
    out = scorer._device_step(batch)
    assert {v.device for v in out.values()} == {meta}
    assert out["pixel_raw"].shape[0] == 4 and out["heatmap"].dtype == torch.uint8
    scorer._release(job)


def _scores(store: str) -> dict:
    rel = Store(store).read("relevancy", columns=["key", "tag_index", "pixel_raw", "selected"]).to_pylist()
    return {(r["key"], r["tag_index"]): (r["pixel_raw"], r["selected"]) for r in rel}


@pytest.mark.parametrize("settings", [{"decoder": "device"}, {"precision": "bf16"}], ids=["device-decoder", "bf16"])
def test_device_decoding_and_bf16_score_close_to_the_reference_and_are_fingerprinted(tmp_path, settings):
    """JPEGs decoded and resized by torchvision on the model's device (libjpeg here, nvJPEG on CUDA), or the model in
    bf16: scores within a small distance of PIL + fp32 on the same shards, and a store scored one way is re-scored,
    not mixed, when the setting changes."""
    corpus = str(tmp_path / "c")
    build_corpus(corpus, shards=2, per_shard=6)
    stores = {}
    for name, cfg in (("reference", {"decoder": "pil", "precision": "fp32"}), ("changed", settings)):
        stores[name] = str(tmp_path / f"s-{name}")
        write_simple_tags(stores[name], corpus)
        summary = run_score(corpus, stores[name], ScoreConfig(**cfg), model=MODEL, workers=0)
        assert summary["done"] == 2 and summary["images"] == 12 and summary["errors"] == 0
    ref, changed = _scores(stores["reference"]), _scores(stores["changed"])
    assert ref.keys() == changed.keys()
    gap = max(abs(ref[k][0] - changed[k][0]) for k in ref)
    assert 0 < gap < (0.02 if "precision" in settings else 0.01), gap  # close, but not the same computation
    agree = sum(ref[k][1] == changed[k][1] for k in ref) / len(ref)
    assert agree >= 0.95, agree
    # on a CPU 'auto' means PIL and fp32: the reference store is done under it, the changed one is re-scored
    assert run_score(corpus, stores["reference"], model=MODEL, workers=0)["skipped_done"] == 2
    assert run_score(corpus, stores["changed"], model=MODEL, workers=0)["done"] == 2


@pytest.mark.slow
def test_the_ray_pool_grows_as_gpus_join_the_cluster(tmp_path, ray_gpu_head):
    """A cluster that autoscales: one GPU when the first batch of shards is scored, a second GPU node joins before
    the next batch. The kept actor scores again (its model loaded once) and a new actor starts for the new GPU."""
    import ray

    from ttd.stages import engine as score_ray

    address = ray_gpu_head[0]
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=4, per_shard=4)
    write_simple_tags(store, corpus)
    first = run_score(corpus, store, model=MODEL, ray_address=address, shards=["00000", "00001"])
    assert first["done"] == 2 and first["workers"] == 1
    (pid,) = ray.get([a.alive.remote() for a in score_ray._ACTORS["actors"]])
    with ray_node(f"--address={address}", "--num-cpus=1", "--num-gpus=1"):
        deadline = time.monotonic() + 180
        while ray.cluster_resources().get("GPU", 0) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        second = run_score(corpus, store, model=MODEL, ray_address=address, shards=["00002", "00003"])
        assert second["done"] == 2 and second["workers"] == 2
        pids = ray.get([a.alive.remote() for a in score_ray._ACTORS["actors"]])
        assert pids[0] == pid and len(set(pids)) == 2
    assert Store(store).read("relevancy").num_rows == Store(store).read("tags").num_rows
