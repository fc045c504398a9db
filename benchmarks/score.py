"""Benchmarks of the `score` stage, each against a naive baseline on the same input in the same process run.

1. stage: `run_score` against a naive scorer (one image at a time, every caption's tags encoded afresh through the
   prompt ensemble with open_clip's plain `encode_text`, the same dense head and scores). Both select the same tags.
2. pipeline: the scorer's pipelined schedule against its serial one (same steps, same bytes). On a CPU the model
   dominates and no overlap can show, so the model's two passes (image forward, caption text tower) are replaced by
   a **stand-in device**: a step that holds each batch for a fixed time without using the CPU (as a GPU would), set
   equal to the CPU work per batch measured by a serial run whose device takes no time (read, decode, the batched
   scoring, rows, write). The serial schedule then pays the sum of the stages, the pipelined one about the slowest.
   Run at torch's 1 and default intra-op threads, best of 3; per-stage timings printed; with the real model, serial
   and pipelined tables are checked equal byte for byte.
3. post: one batch's post-processing, batched on the device (`ttd.stages.score_batch`: one gather, one batched matmul,
   normalisation and quantisation batched, Arrow columns from arrays) against the per-sample loop it replaced
   (per sample four host copies, per tag a normalise/quantise and a Python dict).
4. decode: one core's cost per image of host decoding (PIL decode, resize to 224, crop) of 400x300 and 1024x768
   JPEGs, and of the header check that is the host's only work per JPEG when the GPU decodes (`decoder: device`):
   the figures behind the per-stage budget for a GPU in docs/BENCHMARKS.md (no baseline: costs, not claims).

    .venv/bin/python benchmarks/score.py              # every section
    .venv/bin/python benchmarks/score.py --only pipeline,post
    .venv/bin/python benchmarks/score.py --quick      # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ttd.configs import ScoreConfig
from ttd.corpus import Sample, open_corpus
from ttd.models import load_model
from ttd.models.dense import encode_image_dense
from ttd.models.relevancy import encode_tags, encode_texts, normalisations, normalise, raw_scores
from ttd.stages.engine import plan
from ttd.stages.score import ShardScorer, run_score, stage_spec
from ttd.stages.score_batch import Candidates, batch_tables, compute, to_host
from ttd.store import schemas
from ttd.store.heatmap import quantise
from ttd.store.store import Store
from ttd.synth.generate import SynthConfig, synthesize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def parse_tags(corpus: str, store: str) -> None:
    """The real parse stage when it exists; the tests' whitespace splitter otherwise."""
    try:
        from ttd.configs import ParseConfig
        from ttd.stages.parse import run_parse
    except ImportError:
        from conftest import write_simple_tags

        write_simple_tags(store, corpus)
        return
    run_parse(corpus, store, ParseConfig())


@torch.no_grad()
def naive(corpus_uri: str, store_uri: str, model: str, config: ScoreConfig) -> tuple[float, int, dict]:
    bundle = load_model(model, device="cpu")
    tags = Store(store_uri).read("tags", columns=["key", "tag_index", "lower"]).to_pylist()
    by_key: dict[str, list[dict]] = {}
    for r in tags:
        by_key.setdefault(r["key"], []).append(r)
    corpus = open_corpus(corpus_uri)
    selected = {}
    n = 0
    t0 = time.perf_counter()
    for shard in corpus.shards():
        for s in corpus.read_shard(shard):
            if not isinstance(s, Sample) or s.key not in by_key:
                continue
            image = bundle.preprocess(s.image()).unsqueeze(0)
            g, dense = encode_image_dense(bundle.model, image, config.head)
            cands = sorted(by_key[s.key], key=lambda r: r["tag_index"])
            tag_emb = encode_tags(bundle, [c["lower"] for c in cands], config.templates, trim=False)  # no cache
            cap = encode_texts(bundle, [s.caption or ""], trim=False)[0]
            pixel, _, _, _ = raw_scores(g[0], dense[0], cap, tag_emb)
            sel = normalise(pixel.numpy(), config.normalisation) >= config.threshold
            for c, v in zip(cands, sel):
                selected[(s.key, c["tag_index"])] = bool(v)
            n += 1
    return time.perf_counter() - t0, n, selected


def stage(corpus_uri: str, tags_store: str, tmp: Path, model: str, config: ScoreConfig) -> tuple[float, int, dict]:
    store = tmp / f"stage-{model}"
    shutil.copytree(tags_store, store)
    t0 = time.perf_counter()
    summary = run_score(corpus_uri, str(store), config, model=model, workers=0)
    seconds = time.perf_counter() - t0
    rel = Store(str(store)).read("relevancy", columns=["key", "tag_index", "selected"]).to_pylist()
    return seconds, summary["images"], {(r["key"], r["tag_index"]): r["selected"] for r in rel}


# ---------------------------------------------------------------- 2. pipelined vs serial, stand-in device

class StandInDevice:
    """The model's two passes (image forward, caption text tower) replaced by a wait: each batch is held `seconds`
    without using the CPU, as a GPU would hold it from the host's point of view; the outputs are one real pass's,
    sliced to the batch (the same every run)."""

    def __init__(self, scorer: ShardScorer, seconds: float, batch_size: int):
        size = scorer.bundle.image_size
        self.seconds = seconds
        self.images = scorer.forward(torch.zeros(batch_size, 3, size, size))
        self.captions = scorer.encode_captions(["a photo"] * batch_size)
        scorer.forward, scorer.encode_captions = self.forward, self.encode_captions

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.seconds)
        g, d = self.images
        return g[:images.shape[0]], d[:images.shape[0]]

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        return self.captions[:len(captions)]


def _scorer(corpus: str, store: str, model: str, config: ScoreConfig) -> tuple[ShardScorer, list]:
    scorer = ShardScorer({"uri": corpus, "format": "webdataset", "name": "train"}, store, {"name": model},
                         config.model_dump(mode="json"), "cpu")
    planned = plan(open_corpus(corpus), Store(store), stage_spec(scorer.config, scorer.model_id))
    return scorer, [p for p in planned if p.status == "todo"]


def _timed_run(corpus: str, tags_store: Path, tmp: Path, name: str, model: str, config: ScoreConfig,
               pipelined: bool, stand_in: float | None) -> dict:
    store = tmp / name
    shutil.copytree(tags_store, store)
    scorer, todo = _scorer(corpus, str(store), model, config)
    if stand_in is not None:
        StandInDevice(scorer, stand_in, config.batch_size)
    # the corpus's tag vocabulary embedded first, as a corpus-scale run has it (a CC3M vocabulary is embedded within
    # its first shards): the text tower's per-tag pass is then not what is timed
    vocabulary = sorted(set(Store(str(store)).read("tags", columns=["lower"])["lower"].to_pylist()))
    scorer._tag_embeddings(todo[0].shard, vocabulary)
    scorer.score_shards(todo[:1], pipelined=pipelined)  # warm-up: first-call costs
    scorer.timings = type(scorer.timings)()
    t0 = time.perf_counter()
    results = scorer.score_shards(todo[1:], pipelined=pipelined)
    seconds = time.perf_counter() - t0
    images = sum(r["images"] for r in results)
    return {"seconds": round(seconds, 3), "images": images, "images_per_s": round(images / seconds, 1),
            "stages": scorer.timings.as_dict(), "store": str(store)}


def _tables(store: str) -> dict[str, pa.Table]:
    s = Store(store)
    return {t: s.read(t).sort_by([("shard", "ascending"), ("key", "ascending")] + (
        [("tag_index", "ascending")] if t != "errors" else [])) for t in ("relevancy", "masks", "errors")}


def best_of(runs: list[dict]) -> dict:
    """The fastest of repeated runs (this machine is shared: the minimum is the least disturbed)."""
    return min(runs, key=lambda r: r["seconds"])


def pipeline_section(tmp: Path, images: int, image_size: int, batch: int, model: str, repeats: int = 3) -> dict:
    out = tmp / "synth-pipeline"
    synthesize(str(out), train=images, eval=0, seed=1,
               config=SynthConfig(image_size=image_size, shard_size=max(batch, images // 8)))
    corpus, tags_store = str(out / "train"), tmp / "tags-pipeline"
    Store(str(tags_store), create=True)
    parse_tags(corpus, str(tags_store))
    config = ScoreConfig(batch_size=batch, decode_threads=2)
    real = {mode: _timed_run(corpus, tags_store, tmp, f"real-{mode}", model, config, mode == "pipelined", None)
            for mode in ("serial", "pipelined")}
    a, b = _tables(real["serial"]["store"]), _tables(real["pipelined"]["store"])
    equal = all(a[t].drop_columns(["shard"]).equals(b[t].drop_columns(["shard"])) for t in a)
    for mode, r in real.items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if k != "batches")
        print(f"pipeline real model {mode:19s} {r['images_per_s']:8.1f} img/s  ({r['images']} images, "
              f"{r['stages']['batches']} batches; seconds per stage: {stages})")
    print(f"pipeline real model: serial and pipelined tables equal byte for byte: {equal}")
    result = {"real": real, "tables_equal": equal, "stand_in": {}}
    default_threads = torch.get_num_threads()
    # torch's intra-op threads: 1 stands for a GPU, whose device step uses no host core; with torch's default (one
    # per core) the CPU-side batched scoring's OpenMP workers spin and fight the decode threads for the two cores
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        # the CPU work per batch: a serial run whose device takes no time (what is left of the device step, the
        # batched scoring, is CPU work here; on a GPU it is device work too)
        def stand(name: str, cfg: ScoreConfig, pipelined: bool, seconds: float, threads: int = threads) -> dict:
            return best_of([_timed_run(corpus, tags_store, tmp, f"stand-{name}-{threads}-{i}", model, cfg,
                                       pipelined, seconds) for i in range(repeats)])

        free = stand("free", config, False, 0.0)
        cpu_per_batch = free["seconds"] / max(free["stages"]["batches"], 1)
        procs = config.model_copy(update={"decode_processes": 2})
        runs = {"serial": stand("serial", config, False, cpu_per_batch),
                "pipelined": stand("pipelined", config, True, cpu_per_batch),
                "pipelined+processes": stand("processes", procs, True, cpu_per_batch)}
        ratios = {m: runs["serial"]["seconds"] / runs[m]["seconds"] for m in ("pipelined", "pipelined+processes")}
        for mode, r in runs.items():
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if k != "batches")
            print(f"pipeline stand-in, torch threads {threads}: {mode:19s} {r['images_per_s']:8.1f} img/s  "
                  f"(seconds per stage: {stages})")
        print(f"pipeline stand-in, torch threads {threads}: device holds each batch {1e3 * cpu_per_batch:.1f} ms (the "
              f"CPU work per batch, from a serial run with a device that takes no time: {free['images_per_s']:.1f} "
              f"img/s); pipelined / serial = {ratios['pipelined']:.2f}x with decode threads, "
              f"{ratios['pipelined+processes']:.2f}x with 2 decode processes (ideal on 2 cores: 2.0x)")
        result["stand_in"][f"torch_threads_{threads}"] = {"ms_per_batch": round(1e3 * cpu_per_batch, 2), "runs": runs,
                                                       **{f"ratio_{k}": round(v, 3) for k, v in ratios.items()}}
    torch.set_num_threads(default_threads)
    return result


# ---------------------------------------------------------------- 3. post-processing alone

def per_sample_post(global_emb, dense, cap_emb, matrix, rows, keys, cfg: ScoreConfig) -> tuple[pa.Table, pa.Table]:
    """The loop the batched post-processing replaced: per sample `raw_scores`, then the loop below."""
    per_sample = [raw_scores(global_emb[i], dense[i], cap_emb[i], matrix[r]) for i, r in enumerate(rows)]
    return per_sample_from_maps([p[3] for p in per_sample], [p[:3] for p in per_sample], rows, keys, cfg)


def batched_post(global_emb, dense, cap_emb, matrix, rows, keys, cfg: ScoreConfig) -> tuple[pa.Table, pa.Table]:
    host = to_host(compute(global_emb, dense, cap_emb, matrix, Candidates.pack(rows),
                           normalisation=normalisations(cfg, None), selection=cfg.selection, threshold=cfg.threshold))
    counts, candidates = _named(rows)
    return batch_tables(host, keys, counts, candidates, threshold=cfg.threshold, model_id="m", head=cfg.head,
                        masks_for="selected")


def _named(rows: list[list[int]]) -> tuple[np.ndarray, pa.Table]:
    return (np.array([len(r) for r in rows]), pa.table({"tag_index": pa.array([j for r in rows for j in range(len(r))],
                                                                             pa.int32()),
                                                      "text": [f"t{j}" for r in rows for j in range(len(r))]}))


def per_sample_from_maps(maps, raws, rows, keys, cfg: ScoreConfig) -> tuple[pa.Table, pa.Table]:
    """The replaced loop from the heatmaps on: per sample four host copies, per tag normalise/quantise and a dict."""
    rel_rows, mask_rows = [], []
    for i, r in enumerate(rows):
        pixel, image, text = raws[i]
        raw = {"pixel": pixel.cpu().numpy(), "image": image.cpu().numpy(), "text": text.cpu().numpy()}
        norms = normalisations(cfg, None)
        norm = {k: normalise(v, *norms[k]) for k, v in raw.items()}
        selected = norm[cfg.selection] >= cfg.threshold
        m = maps[i].cpu().numpy()
        for j in range(len(r)):
            rel_rows.append({"key": keys[i], "tag_index": j, "text": f"t{j}", "pixel_raw": raw["pixel"][j],
                             "image_raw": raw["image"][j], "text_raw": raw["text"][j],
                             "pixel_score": norm["pixel"][j], "image_score": norm["image"][j],
                             "text_score": norm["text"][j], "selected": bool(selected[j]),
                             "threshold": cfg.threshold, "model_id": "m", "head": cfg.head})
            if selected[j]:
                data, lo, hi = quantise(m[j])
                mask_rows.append({"key": keys[i], "tag_index": j, "text": f"t{j}", "height": m.shape[1],
                                  "width": m.shape[2], "heatmap": data, "vmin": lo, "vmax": hi})
    return (pa.Table.from_pylist(rel_rows, schema=schemas.get("relevancy").arrow),
            pa.Table.from_pylist(mask_rows, schema=schemas.get("masks").arrow))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def post_section(batch: int, grid: int, dim: int, tags_per_caption: int, vocabulary: int, repeats: int) -> dict:
    """Two measures: the whole of a batch's scoring after the forward (heatmap matmul included: FLOP-bound on a
    CPU, the same work on both sides), and what follows the heatmaps (normalise, select, quantise, copies, rows),
    the part a GPU does not hide."""
    from ttd.stages.score_batch import finish, heatmaps

    g = torch.Generator().manual_seed(0)
    global_emb, dense = torch.randn(batch, dim, generator=g), torch.randn(batch, grid, grid, dim, generator=g)
    cap_emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    matrix = torch.nn.functional.normalize(torch.randn(vocabulary, dim, generator=g), dim=-1)
    lengths = torch.randint(max(1, tags_per_caption - 6), tags_per_caption + 7, (batch,), generator=g)
    rows = [torch.randint(0, vocabulary, (int(n),), generator=g).tolist() for n in lengths]
    keys = [f"{i:09d}" for i in range(batch)]
    cfg = ScoreConfig()
    args = (global_emb, dense, cap_emb, matrix, rows, keys, cfg)
    times = {"per_sample": _time(lambda: per_sample_post(*args), repeats),
             "batched": _time(lambda: batched_post(*args), repeats)}
    # from the heatmaps on: both sides start from the same maps, computed once outside the timing
    per_sample = [raw_scores(global_emb[i], dense[i], cap_emb[i], matrix[r]) for i, r in enumerate(rows)]
    maps_list, raws = [p[3] for p in per_sample], [p[:3] for p in per_sample]
    cands = Candidates.pack(rows)
    maps, raw = heatmaps(global_emb, dense, cap_emb, matrix, cands)
    counts, candidates = _named(rows)

    def batched_after_maps():
        host = to_host(finish(maps, raw, cands.valid, normalisation=normalisations(cfg, None), selection=cfg.selection,
                              threshold=cfg.threshold))
        return batch_tables(host, keys, counts, candidates, threshold=cfg.threshold, model_id="m", head=cfg.head,
                            masks_for="selected")

    times["per_sample_after_maps"] = _time(lambda: per_sample_from_maps(maps_list, raws, rows, keys, cfg), repeats)
    times["batched_after_maps"] = _time(batched_after_maps, repeats)
    # what stays on the host when the device is a GPU: the Arrow rows from the copied arrays
    host = to_host(finish(maps, raw, cands.valid, normalisation=normalisations(cfg, None), selection=cfg.selection,
                          threshold=cfg.threshold))
    times["host_rows"] = _time(lambda: batch_tables(host, keys, counts, candidates, threshold=cfg.threshold,
                                                    model_id="m", head=cfg.head, masks_for="selected"), repeats)
    a = per_sample_post(*args)[0]
    b = batched_post(*args)[0]
    agree = float(np.mean(np.asarray(a.column("selected")) == np.asarray(b.column("selected"))))
    ratio = times["per_sample"] / times["batched"]
    ratio_post = times["per_sample_after_maps"] / times["batched_after_maps"]
    print(f"post-processing batch {batch} x ~{tags_per_caption} tags ({a.num_rows} candidates), {grid}x{grid} grid, "
          f"dim {dim}: whole (heatmap matmul included) per-sample {1e3 * times['per_sample']:.1f} ms, batched "
          f"{1e3 * times['batched']:.1f} ms, ratio {ratio:.1f}x; after the heatmaps per-sample "
          f"{1e3 * times['per_sample_after_maps']:.1f} ms, batched {1e3 * times['batched_after_maps']:.1f} ms, "
          f"ratio {ratio_post:.1f}x (of which Arrow rows {1e3 * times['host_rows']:.1f} ms: the host's share on a "
          f"GPU); selection agreement {agree:.4f}")
    return {**{f"{k}_ms": round(1e3 * v, 2) for k, v in times.items()}, "ratio_whole": round(ratio, 2),
            "ratio_after_maps": round(ratio_post, 2), "selection_agreement": agree}


# ---------------------------------------------------------------- 4. host decoding, for the GPU budget

def decode_section(images: int) -> dict:
    """One core's cost per image of what the decode workers do (PIL decode, bicubic resize to 224, crop) on the GPU
    benchmark's photo-like JPEGs, with and without PIL's `draft` (JPEG DCT scaling before the resize)."""
    import io

    import torchvision.transforms as T
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_score import _jpeg

    from ttd.stages.score_pipeline import device_decodable, host_array

    steps = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])

    def plain(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    def drafted(data: bytes) -> Image.Image:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (224, 224))
        return im.convert("RGB")

    result = {}
    for size in ((400, 300), (1024, 768)):
        blobs = [_jpeg(i, size) for i in range(images)]
        row = {"jpeg_kb": round(float(np.mean([len(b) for b in blobs])) / 1e3, 1)}
        for name, fn in (("decode", plain), ("decode_resize_crop", lambda b: host_array(steps, plain(b))),
                         ("draft_decode_resize_crop", lambda b: host_array(steps, drafted(b))),
                         ("header_check", lambda b: device_decodable(b, 64_000_000))):
            row[f"{name}_ms"] = round(1e3 * _time(lambda fn=fn, blobs=blobs: [fn(b) for b in blobs], 1) / len(blobs), 2)
        result[f"{size[0]}x{size[1]}"] = row
        print(f"decode {size[0]}x{size[1]} JPEG ({row['jpeg_kb']} KB), one core: decode {row['decode_ms']} ms, "
              f"+ resize 224 + crop {row['decode_resize_crop_ms']} ms, with PIL draft "
              f"{row['draft_decode_resize_crop_ms']} ms; header check for the GPU's decoder "
              f"{row['header_check_ms']} ms per image")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="stage,pipeline,post,decode", help="sections to run, comma-separated")
    ap.add_argument("--tiny-images", type=int, default=200)
    ap.add_argument("--vitb-images", type=int, default=24)
    ap.add_argument("--skip-vitb", action="store_true")
    ap.add_argument("--pipeline-images", type=int, default=640)
    ap.add_argument("--pipeline-image-size", type=int, default=384, help="JPEG size of the pipeline corpus")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (default: Python's)")
    args = ap.parse_args()
    if args.quick:
        args.tiny_images, args.vitb_images, args.pipeline_images = 48, 8, 160
    sections = set(args.only.split(","))
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch threads: {torch.get_num_threads()}")
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "stage" in sections:
            results["stage"] = stage_section(tmp, args)
        if "pipeline" in sections:
            results["pipeline"] = pipeline_section(tmp, args.pipeline_images, args.pipeline_image_size, 32,
                                                   "ttd-tiny", 1 if args.quick else 3)
        if "post" in sections:
            results["post"] = post_section(256, 14, 512, 12, 2000, 2 if args.quick else 10)
        if "decode" in sections:
            results["decode"] = decode_section(10 if args.quick else 40)
    if args.json:
        print(json.dumps(results))


def stage_section(tmp: Path, args: argparse.Namespace) -> dict:
    runs = [("ttd-tiny", args.tiny_images, ScoreConfig(batch_size=64))]
    if not args.skip_vitb:
        runs.append(("ViT-B-16", args.vitb_images, ScoreConfig(batch_size=8)))
    out_results = {}
    for model, n_images, config in runs:
        out = tmp / f"synth-{model}"
        synthesize(str(out), train=n_images, eval=0, seed=0)
        corpus = str(out / "train")
        tags_store = tmp / f"tags-{model}"
        Store(str(tags_store), create=True)
        parse_tags(corpus, str(tags_store))
        t_naive, n1, sel_naive = naive(corpus, str(tags_store), model, config)
        t_stage, n2, sel_stage = stage(corpus, str(tags_store), tmp, model, config)
        assert n1 == n2, (n1, n2)
        agree = np.mean([sel_naive[k] == sel_stage.get(k) for k in sel_naive])
        r_naive, r_stage = n1 / t_naive, n2 / t_stage
        print(f"stage {model:9s} images={n1:4d}  naive {r_naive:8.2f} img/s  stage {r_stage:8.2f} img/s  "
              f"ratio {r_stage / r_naive:5.2f}x  selection agreement {agree:.4f}")
        out_results[model] = {"naive_images_per_s": round(r_naive, 2), "stage_images_per_s": round(r_stage, 2),
                              "ratio": round(r_stage / r_naive, 2), "selection_agreement": float(agree)}
    return out_results


if __name__ == "__main__":
    main()
