"""GPU benchmark of `ttd distill`'s training step, prepared for a lent device (one short call), with a CPU smoke mode.

A randomly initialised ViT-B-16 (same cost as a pretrained one) with the dense head, bf16 autocast, on synthetic
batches already on the device (images, caption tokens, one prompt per distinct tag, target maps): training
samples/s and peak memory for

- naive: full fine-tuning, fp32 (no autocast), the text tower run on the full 77-token context;
- ours:  LoRA (rank 8, both towers, every block) with bf16 autocast and tokens cut after the longest prompt.

Both run the same losses (`ttd.train.distill_losses.losses`) on the same batches, so the ratio is the speed-up of
our path.

    python benchmarks/gpu_distill.py                       # on the GPU machine
    python benchmarks/gpu_distill.py --device cpu --smoke  # anywhere: tiny sizes, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import open_clip
import torch

from ttd.configs import DistillConfig
from ttd.models import load_model
from ttd.models.lora import add_lora
from ttd.train.distill_data import Batch
from ttd.train.distill_losses import losses


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(bundle, batch: int, tags_per_caption: int, distinct_tags: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    size = bundle.image_size
    grid = size // bundle.patch_size
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    words = [f"object{i}" for i in range(distinct_tags)]
    captions = [" ".join(words[(b * 3 + j) % distinct_tags] for j in range(tags_per_caption)) for b in range(batch)]
    tokens = bundle.tokenizer([f"a photo of {c}" for c in captions]).to(device)
    prompts = bundle.tokenizer([f"a photo of a {w}." for w in words]).to(device)
    m = batch * tags_per_caption
    sample_of_tag = torch.arange(batch).repeat_interleave(tags_per_caption).to(device)
    uniq_of_tag = torch.randint(0, distinct_tags, (m,), generator=g).to(device)
    selected = (torch.rand(m, generator=g) < 0.4).to(device)
    targets = torch.rand(m, grid, grid, generator=g).to(device)
    lo = torch.full((m,), -0.1, device=device)
    contrast = torch.full((m,), 0.3, device=device)
    return Batch(images, tokens, prompts, sample_of_tag, uniq_of_tag, selected, targets, lo, contrast, 1)


def train_rate(model, batch: Batch, config: DistillConfig, params, steps: int, device: torch.device,
               amp: bool, trim: bool) -> tuple[float, float]:
    opt = torch.optim.AdamW(params, lr=1e-4)
    clip_loss = open_clip.ClipLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = losses(model, batch, config, clip_loss, trim_text=trim)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    sync(device)
    rate = batch.images.shape[0] * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end (CPU)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tags", type=int, default=12, help="candidate tags per caption")
    ap.add_argument("--distinct-tags", type=int, default=600, help="distinct tags in a batch")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch, args.tags, args.distinct_tags, args.steps = "ttd-micro", 4, 3, 8, 1
    logging.basicConfig(level=logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: use --device cpu --smoke")
    config = DistillConfig(deterministic=False)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
               "batch": args.batch, "tags_per_caption": args.tags}
    amp = device.type == "cuda"

    bundle = load_model(args.model, device=device)
    batch = make_batch(bundle, args.batch, args.tags, args.distinct_tags, device)
    bundle.model.train()
    full = [p for p in bundle.model.parameters() if p.requires_grad]
    results["naive"] = dict(zip(("samples_per_s", "peak_gib"),
                                train_rate(bundle.model, batch, config, full, args.steps, device, False, False)))
    del bundle, full
    if device.type == "cuda":
        torch.cuda.empty_cache()

    bundle = load_model(args.model, device=device)
    deltas = add_lora(bundle.model, rank=config.lora_rank, alpha=config.lora_alpha, towers=config.lora_towers,
                      targets=config.lora_targets)
    bundle.model.train()
    params = [p for d in deltas.values() for p in (d.lora_A, d.lora_B)]
    results["ours"] = dict(zip(("samples_per_s", "peak_gib"),
                               train_rate(bundle.model, batch, config, params, args.steps, device, amp, True)))
    ratio = results["ours"]["samples_per_s"] / results["naive"]["samples_per_s"]
    results["ratio"] = round(ratio, 2)
    for name in ("naive", "ours"):
        r = results[name]
        print(f"{name:5s} {args.model} batch {args.batch}: {r['samples_per_s']:,.1f} samples/s, peak "
              f"{r['peak_gib']:.2f} GiB")
    print(f"ratio ours / naive: {ratio:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
