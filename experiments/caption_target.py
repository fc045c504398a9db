"""Session 5's diagnostics of L_distill (docs/BENCHMARKS.md, "TTD on a stronger base model"): can the caption
heatmap reach its target, and does a fine-tune lower L_distill?

  oracle   For N eval captions: optimise only the caption's embedding (the image's dense features fixed) on
           L_distill against the union of its selected tags' maps, and report caption mIoU before and after, with
           the union's own mIoU beside. `--loss` mse | l1 (the two distances), binary (the union binarised at the
           caption threshold), ce (cross-entropy between the softmax-normalised maps).
  losses   Mean L_distill / L_tag / L_contrastive of the base model or a fine-tune (`--lora`) on 256 pairs of a scored
           corpus: `ttd.stages.distill.validation_losses`.

    python experiments/caption_target.py oracle --root OUT/synth/eval --pretrained OUT/base [--captions 60] \\
        [--steps 150] [--loss mse]
    python experiments/caption_target.py losses --corpus OUT/synth/train --store OUT/store --pretrained OUT/base \\
        [--lora OUT/runs/RUN]
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from jobs import subcommands  # experiments/jobs.py, beside this script

from ttd.configs import DistillConfig, ParseConfig, ScoreConfig
from ttd.corpus import ReadIssue, open_corpus
from ttd.eval.metrics_sql import CAPTION_CLASS_ID, SELECTED_UNION_CLASS_ID
from ttd.eval.tagmask import caption_counts, caption_heatmap, load_ground_truth, read_mask, selected_union
from ttd.models import relevancy as rel
from ttd.models.loading import load_model
from ttd.stages.distill import validation_losses
from ttd.text.tags import CaptionParser
from ttd.train.distill_losses import distill_loss


def _iou(rows: list[dict], class_id: int) -> float | None:
    row = next((r for r in rows if r["class_id"] == class_id and r["target"] > 0), None)
    return None if row is None or not row["union"] else row["intersection"] / row["union"]


def _map_loss(caption_map: torch.Tensor, target: torch.Tensor, form: str, scale: float) -> torch.Tensor:
    if form == "ce":
        return -(F.softmax(target.flatten() * scale, 0) * F.log_softmax(caption_map.flatten() * scale * 10, 0)).sum()
    has = torch.ones(1, dtype=torch.bool)
    return distill_loss(caption_map[None], target[None], has, scale=scale, form="l1" if form == "l1" else "mse")


def oracle(root: str, pretrained: str, captions: int, steps: int, form: str, lr: float, threshold: float,
           bg_threshold: float, scale: float) -> dict:
    torch.manual_seed(0)
    bundle = load_model(None, pretrained, device=torch.device("cpu"))
    cfg = ScoreConfig(threshold=threshold)
    norms = rel.normalisations(cfg, bundle.model)
    words = CaptionParser.from_config(ParseConfig(policy="words"))
    mentions, loc = load_ground_truth(root)
    corpus = open_corpus(root)
    before, after, union_iou, losses = [], [], [], []
    for shard in corpus.shards():
        for item in corpus.read_shard(shard):
            if len(before) >= captions:
                break
            if isinstance(item, ReadIssue) or item.key not in mentions or not item.caption:
                continue
            parsed = words.parse([item.caption])[0]
            if isinstance(parsed, Exception) or parsed is None or not len(parsed):
                continue
            with torch.no_grad():
                image = bundle.preprocess(item.image())[None]
                global_emb, dense = rel.dense_features(bundle.model, image, cfg.head)
                cap = rel.encode_texts(bundle, [item.caption])[0]
                tags = rel.encode_tags(bundle, list(parsed.lower), cfg.templates)
                *raw, maps = rel.raw_scores(global_emb[0], dense[0], cap, tags)
            selected = rel.normalise(raw[-1].numpy(), *norms["pixel"]) >= threshold
            if not selected.any():
                continue
            class_map = read_mask(loc, item.key)
            size = class_map.shape[:2]
            ms = mentions[item.key]
            grid_target = torch.from_numpy(selected_union(maps, selected, maps.shape[1:])).float()
            if form == "binary":
                grid_target = (grid_target >= bg_threshold).float()
            union = selected_union(maps, selected, size)
            first = caption_counts(item.key, caption_heatmap(dense[0], cap, size), class_map, ms, bg_threshold,
                                   union)
            emb = torch.nn.Parameter(cap.clone())
            opt = torch.optim.Adam([emb], lr=lr)
            feats = F.normalize(dense[0].float(), dim=-1)
            for _ in range(steps):
                caption_map = torch.einsum("hwd,d->hw", feats, F.normalize(emb, dim=-1))
                loss = _map_loss(caption_map, grid_target, form, scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                last = caption_counts(item.key, caption_heatmap(dense[0], F.normalize(emb, dim=-1), size),
                                      class_map, ms, bg_threshold)
            if (b := _iou(first, CAPTION_CLASS_ID)) is None:
                continue
            before.append(b)
            after.append(_iou(last, CAPTION_CLASS_ID))
            union_iou.append(_iou(first, SELECTED_UNION_CLASS_ID))
            losses.append(float(loss))
    return {"captions": len(before), "loss": form, "steps": steps,
            "caption_miou_before": round(100 * float(np.mean(before)), 1),
            "caption_miou_after": round(100 * float(np.mean(after)), 1),
            "selected_union_miou": round(100 * float(np.mean(union_iou)), 1),
            "final_loss": round(float(np.mean(losses)), 3)}


def main() -> None:
    required = {"required": True}
    ap = subcommands(__doc__, {
        "oracle": [("--root", required), ("--pretrained", required), ("--captions", {"type": int, "default": 60}),
                   ("--steps", {"type": int, "default": 150}),
                   ("--loss", {"choices": ["mse", "l1", "binary", "ce"], "default": "mse"}),
                   ("--lr", {"type": float, "default": 1e-2}),
                   ("--threshold", {"type": float, "default": 0.5, "help": "selection threshold (session 5: 0.5)"}),
                   ("--bg-threshold", {"type": float, "default": 0.4})],
        "losses": [("--corpus", required), ("--store", required), ("--pretrained", required), ("--lora",),
                   ("--max-samples", {"type": int, "default": 256})],
    })
    args = ap.parse_args()
    if args.cmd == "oracle":
        scale = DistillConfig().heatmap_scale
        result = oracle(args.root, args.pretrained, args.captions, args.steps, args.loss, args.lr, args.threshold,
                        args.bg_threshold, scale)
    else:
        result = validation_losses(args.corpus, args.store, pretrained=args.pretrained, lora=args.lora,
                                   max_samples=args.max_samples)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
