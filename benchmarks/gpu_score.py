"""GPU benchmark of the `score` stage, prepared for a lent device (one short call), with a CPU smoke mode.

1. Model only: a randomly initialised ViT-B-16 (same cost as the pretrained one) with the dense head, weights in
   bf16 as the scorer loads them on CUDA, on pre-decoded tensors already on the device, at 224 and 448 px:
   images/s and the share of the compute bound (`--peak-tflops`, default 790 for one H200 in dense bf16).
2. End to end: the stage's pipelined shard scorer on webdataset shards of real JPEGs at CC3M-like sizes (400x300
   and 1024x768, made by this script); the first shard warms up and is not timed. Runs: JPEGs decoded on the GPU
   (nvJPEG, the CUDA default), then PIL on the host with decode threads swept and in forked processes, and the
   serial schedule once for the ratio. Per run: images/s, seconds per stage (read, decode, device, host, write:
   summed over threads), and the GPU's utilisation as `nvidia-smi` samples it every 100 ms.

    python benchmarks/gpu_score.py                       # on the GPU machine (about 4 minutes)
    python benchmarks/gpu_score.py --device cpu --smoke  # anywhere: tiny sizes, checks the script runs
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ttd.configs import ScoreConfig
from ttd.corpus import open_corpus
from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.models import load_model
from ttd.models.dense import encode_image_dense
from ttd.stages.engine import plan
from ttd.stages.score import ShardScorer, stage_spec
from ttd.store.store import Store
from ttd.store.uri import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def vit_gflops(image_size: int, patch: int = 16, width: int = 768, layers: int = 12, extra_last: bool = True) -> float:
    """Forward GFLOPs of a ViT image tower (2 FLOPs per multiply-add): projections, MLP and attention products.
    With the dense head the last block runs twice (trained + dense path), hence `extra_last`."""
    tokens = (image_size // patch) ** 2 + 1
    per_layer = 2 * tokens * (12 * width * width) + 2 * 2 * tokens * tokens * width
    patch_embed = 2 * (tokens - 1) * (3 * patch * patch) * width
    return (per_layer * (layers + (1 if extra_last else 0)) + patch_embed) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def model_only(bundle, size: int, batch: int, iters: int, device: torch.device, head: str) -> float:
    dtype = next(bundle.model.parameters()).dtype
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm-up (kernels, autotuning)
        encode_image_dense(bundle.model, x, head)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        encode_image_dense(bundle.model, x, head)
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


WORDS = ("dog", "cat", "tree", "car", "person", "beach", "city", "street", "table", "flower", "sky", "house",
         "bicycle", "mountain", "river", "chair", "book", "phone", "window", "road")


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A smooth random picture (a coarse colour field upsampled, plus grain): JPEG sizes like photos'."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_corpus(root: Path, images: int, size: tuple[int, int], per_shard: int) -> str:
    """img2dataset webdataset shards of `images` JPEGs of `size` (w, h) with 8-12 word captions."""
    loc = resolve(str(root))
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(16) as pool:
        for shard in range(-(-images // per_shard)):
            n = min(per_shard, images - shard * per_shard)
            seeds = [shard * per_shard + i for i in range(n)]
            blobs = list(pool.map(_jpeg, seeds, [size] * n))
            w = ShardWriter(loc, shard)
            for i, blob in enumerate(blobs):
                words = rng.choice(WORDS, 3, replace=False)
                caption = f"a photo of a {words[0]} and a {words[1]} next to the {words[2]} on a sunny day"
                w.add(make_key(shard, i), caption, blob, width=size[0], height=size[1])
            w.close()
    return str(root)


class GpuUtilisation:
    """`nvidia-smi` sampled every 100 ms in the background; the mean while running (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self) -> GpuUtilisation:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def end_to_end(model: str, corpus: str, tags_store: Path, tmp: Path, batch: int, device: str, settings: dict
               ) -> dict:
    store = tmp / "store-{}".format("-".join(f"{k}{v}" for k, v in settings.items()))
    shutil.copytree(tags_store, store)
    config = ScoreConfig(batch_size=batch, **settings)
    scorer = ShardScorer({"uri": corpus, "format": "webdataset", "name": "c"}, str(store), {"name": model},
                         config.model_dump(mode="json"), device)
    planned = plan(open_corpus(corpus), Store(str(store)), stage_spec(scorer.config, scorer.model_id))
    todo = [p for p in planned if p.status == "todo"]
    scorer.score_shards(todo[:1])  # model load, kernels and the tag cache are not throughput
    scorer.timings = type(scorer.timings)()
    with GpuUtilisation() as gpu:
        t0 = time.perf_counter()
        images = sum(r["images"] for r in scorer.score_shards(todo[1:]))
        seconds = time.perf_counter() - t0
    scorer.close()
    return {**settings, "decoder": scorer.config.decoder, "precision": scorer.config.precision,
            "pipelined": scorer.config.pipelined, "images": images,
            "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), "gpu_util_percent": gpu.mean,
            "stage_seconds": scorer.timings.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end (CPU)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--head", default="maskclip")
    ap.add_argument("--sizes", default="224,448")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--e2e-images", type=int, default=6000, help="JPEGs per end-to-end corpus")
    ap.add_argument("--jpeg-sizes", default="400x300,1024x768")
    ap.add_argument("--threads", default="8,16,32", help="PIL decode threads swept (400x300 corpus)")
    ap.add_argument("--processes", type=int, default=12, help="PIL decode processes, one run (0: none)")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.iters, args.e2e_images, args.sizes = 2, 1, 8, "224"
        args.jpeg_sizes, args.threads, args.processes = "64x48", "1,2", 2
    logging.basicConfig(level=logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: use --device cpu --smoke")
    bundle = load_model(args.model, device=device)
    bundle.model.to(torch.bfloat16 if ScoreConfig().resolved(device.type).precision == "bf16" else torch.float32)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
               "head": args.head, "model_only": {}, "end_to_end": []}
    for size in (int(s) for s in args.sizes.split(",")):
        batch = max(1, args.batch // (4 if size >= 448 else 1))
        ips = model_only(bundle, size, batch, args.iters, device, args.head)
        v = bundle.model.visual
        gflops = vit_gflops(size, bundle.patch_size, v.conv1.out_channels, len(v.transformer.resblocks))
        share = ips * gflops / 1e3 / args.peak_tflops
        results["model_only"][size] = {"batch": batch, "images_per_s": round(ips, 1),
                                       "gflops_per_image": round(gflops, 1), "share_of_peak": round(share, 3)}
        print(f"model-only {args.model} {size}px batch {batch}: {ips:,.1f} images/s, {gflops:.1f} GFLOPs/image, "
              f"{100 * share:.1f}% of {args.peak_tflops:.0f} TFLOP/s", flush=True)
    del bundle
    from conftest import write_simple_tags

    batch = min(args.batch, 256)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, jpeg_size in enumerate(args.jpeg_sizes.split(",")):
            w, h = (int(x) for x in jpeg_size.split("x"))
            images = args.e2e_images if i == 0 else max(2, args.e2e_images // 3)
            corpus = make_corpus(tmp / f"corpus-{jpeg_size}", images, (w, h), max(1, images // 6))
            tags = tmp / f"tags-{jpeg_size}"
            Store(str(tags), create=True)
            write_simple_tags(str(tags), corpus)
            threads = [int(t) for t in args.threads.split(",")]
            runs = [{"decoder": "device", "decode_threads": max(threads)}]  # 'auto' on CUDA
            runs += [{"decoder": "pil", "decode_threads": t} for t in (threads if i == 0 else threads[-1:])]
            if args.processes and i == 0:
                runs.append({"decoder": "pil", "decode_processes": args.processes})
            runs.append({"decoder": "device", "decode_threads": max(threads), "pipelined": False})
            for settings in runs:
                r = end_to_end(args.model, corpus, tags, tmp / f"run-{jpeg_size}", batch, args.device, settings)
                r["jpeg"] = jpeg_size
                results["end_to_end"].append(r)
                stages = ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())
                what = ", ".join(f"{k} {v}" for k, v in settings.items())
                print(f"end-to-end {args.model} {jpeg_size} JPEGs, {what}, {r['precision']}: "
                      f"{r['images_per_s']:,.1f} images/s ({r['images']} in {r['seconds']} s; "
                      f"GPU {r['gpu_util_percent']}%; {stages})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
