"""`ttd pretrain`'s training step on this machine: pairs/s of the embedded recipe's step (ttd-tiny, 96 px, AdamW,
CLIP loss), fp32 against bf16 autocast, at batch 64 and 128, on the same synthetic batch in one process.

What it decides: how long the embedded recipe (2,000 steps of 128) takes on 2 CPU cores, and whether bf16
autocast is worth taking on this CPU (the recipe runs fp32: the gain was small, docs/BENCHMARKS.md).

    python benchmarks/pretrain.py [--threads 2] [--steps 4] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
import torch

from ttd.models.loading import load_model


def step_seconds(model, opt, images, tokens, bf16: bool, steps: int) -> float:
    loss_fn = open_clip.ClipLoss()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, tokens)
            img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
                if isinstance(out, dict) else out[:3]
            loss = loss_fn(img.float(), txt.float(), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="batch 4 and 8, one step: checks the script runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("ttd-tiny", device="cpu", seed=0)
    model = bundle.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = bundle.image_size
    result = {"threads": args.threads, "runs": []}
    for batch in ((4, 8) if args.smoke else (64, 128)):
        images = torch.randn(batch, 3, size, size)
        tokens = bundle.tokenizer(["a dog on the grass near a red car"] * batch)
        row = {"batch": batch}
        for bf16 in (False, True):
            seconds = step_seconds(model, opt, images, tokens, bf16, 1 if args.smoke else args.steps)
            row["bf16" if bf16 else "fp32"] = round(batch / seconds, 1)
        row["bf16_over_fp32"] = round(row["bf16"] / row["fp32"], 2)
        result["runs"].append(row)
        print(f"batch {batch}: fp32 {row['fp32']} pairs/s, bf16 autocast {row['bf16']} pairs/s "
              f"({row['bf16_over_fp32']}x)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
