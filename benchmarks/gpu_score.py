"""GPU benchmark of the `score` stage, prepared for a lent device (one short call), with a CPU smoke mode.

1. Model only: a randomly initialised ViT-B-16 (same cost as the pretrained one) with the dense head, bf16
   autocast, on pre-decoded tensors already on the device, at 224 and 448 px: images/s and the share of the
   compute bound (`--peak-tflops`, default 790 for one H200 in dense bf16).
2. End to end: the stage's shard scorer on a TagMask-Synth webdataset corpus (JPEG decoding, preprocessing, tag
   cache, store writes included; the first shard warms up and is not timed): images/s.

    python benchmarks/gpu_score.py                       # on the GPU machine
    python benchmarks/gpu_score.py --device cpu --smoke  # anywhere: tiny sizes, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from ttd.corpus import open_corpus
from ttd.models import load_model
from ttd.models.dense import encode_image_dense
from ttd.relevancy import ScoreConfig
from ttd.score import ShardScorer
from ttd.store import Store
from ttd.synth.generate import SynthConfig, synthesize

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
    x = torch.randn(batch, 3, size, size, device=device)
    amp = device.type == "cuda"
    for _ in range(2):  # warm-up (kernels, autotuning)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            encode_image_dense(bundle.model, x, head)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            encode_image_dense(bundle.model, x, head)
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def end_to_end(model: str, n_images: int, image_size: int, batch: int, device: str, tmp: Path) -> dict:
    from conftest import write_simple_tags

    corpus = tmp / "synth"
    synthesize(str(corpus), train=n_images, eval=0, seed=0,
               config=SynthConfig(image_size=image_size, shard_size=max(1, n_images // 4)))
    store = tmp / "store"
    Store(str(store), create=True)
    write_simple_tags(str(store), str(corpus / "train"))
    config = ScoreConfig(batch_size=batch, decode_threads=16)
    corpus_spec = {"uri": str(corpus / "train"), "format": "webdataset", "name": "train"}
    scorer = ShardScorer(corpus_spec, str(store), {"name": model}, config.model_dump(mode="json"), device)
    shards = open_corpus(str(corpus / "train")).shards()
    scorer.score_shard(shards[0], "warmup", "")  # model load, kernels and the tag cache are not throughput
    t0 = time.perf_counter()
    images = sum(scorer.score_shard(shard, "timed", "")["images"] for shard in shards[1:])
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end (CPU)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--head", default="maskclip")
    ap.add_argument("--sizes", default="224,448")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--e2e-images", type=int, default=8000)
    ap.add_argument("--e2e-image-size", type=int, default=256, help="source JPEG size of the end-to-end corpus")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.iters, args.e2e_images, args.sizes = 2, 1, 8, "224"
    logging.basicConfig(level=logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: use --device cpu --smoke")
    bundle = load_model(args.model, device=device)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
               "head": args.head, "model_only": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        batch = max(1, args.batch // (4 if size >= 448 else 1))
        ips = model_only(bundle, size, batch, args.iters, device, args.head)
        v = bundle.model.visual
        gflops = vit_gflops(size, bundle.patch_size, v.conv1.out_channels, len(v.transformer.resblocks))
        share = ips * gflops / 1e3 / args.peak_tflops
        results["model_only"][size] = {"batch": batch, "images_per_s": round(ips, 1),
                                       "gflops_per_image": round(gflops, 1), "share_of_peak": round(share, 3)}
        print(f"model-only {args.model} {size}px batch {batch}: {ips:,.1f} images/s, {gflops:.1f} GFLOPs/image, "
              f"{100 * share:.1f}% of {args.peak_tflops:.0f} TFLOP/s")
    del bundle
    with tempfile.TemporaryDirectory() as d:
        e2e = end_to_end(args.model, args.e2e_images, args.e2e_image_size, min(args.batch, 256), args.device,
                         Path(d))
    results["end_to_end"] = e2e
    print(f"end-to-end {args.model} from webdataset: {e2e['images_per_s']:,.1f} images/s "
          f"({e2e['images']} images in {e2e['seconds']} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
