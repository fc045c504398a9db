"""`ttd pretrain`: contrastive (CLIP) pre-training of a tiny open_clip ViT on an image-text corpus.

This makes the embedded default base model: no pretrained CLIP weights can be downloaded here, so the product
trains its own on TagMask-Synth. Deterministic for a seed on a given machine and thread count: data order, weight
initialisation and every random draw come from the seed. The corpus is decoded once into memory as uint8 tensors
at the model's input size (20,000 images of 96 px are 550 MB), since many epochs would otherwise decode every JPEG
again each time. A checkpoint every `checkpoint_every` steps (`OUT/checkpoint/`, `ttd.train.checkpoints`): a killed run,
re-run with the same inputs, continues from it bit for bit, so a recipe longer than one sitting can be trained in
several.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ttd import __version__
from ttd.configs import PRETRAIN_PERF_FIELDS, PretrainConfig
from ttd.corpus import ReadIssue, open_corpus
from ttd.errors import ImageDecodeError, TTDError
from ttd.models.artefact import ARTEFACT_CONFIG, save_model
from ttd.models.loading import load_model
from ttd.store import schemas
from ttd.store.store import fingerprint
from ttd.train import checkpoints
from ttd.train.checkpoints import CHECKPOINT_DIR
from ttd.train.recipe import adamw, geometry_and_norm, lr_at, param_groups

log = logging.getLogger(__name__)


def load_pairs(corpus_uri: str, bundle, max_samples: int | None, progress: Callable[[int], None] | None = None):
    """All (image, caption) pairs of a corpus as a uint8 image tensor [N, 3, S, S] and token ids [N, L]."""
    geo, _, _ = geometry_and_norm(bundle.preprocess)
    corpus = open_corpus(corpus_uri)
    images, captions, skipped = [], [], 0
    for shard in corpus.shards():
        for item in corpus.read_shard(shard):
            if isinstance(item, ReadIssue):
                skipped += item.severity == "error"
                continue
            if not item.caption or not item.caption.strip():
                skipped += 1
                continue
            try:
                img = geo(item.image())
            except ImageDecodeError:
                skipped += 1
                continue
            images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            captions.append(item.caption)
            if progress:
                progress(1)
            if max_samples and len(images) >= max_samples:
                break
        if max_samples and len(images) >= max_samples:
            break
    if len(images) < 2:
        raise TTDError(f"corpus {corpus_uri!r} has fewer than 2 usable image-caption pairs")
    if skipped:
        log.warning("skipped %d unusable samples (bad image or empty caption)", skipped)
    return torch.stack(images), bundle.tokenizer(captions), captions


def run_pretrain(corpus_uri: str, out_dir: str, config: PretrainConfig | None = None, *, seed: int = 0,
                 device: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train and write `out_dir/model.safetensors`, `model.json` and `train_log.parquet`; returns a summary."""
    config = config or PretrainConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / ARTEFACT_CONFIG).exists() \
            and not (out / CHECKPOINT_DIR).exists():
        raise TTDError(f"--out {out_dir!r} exists and is not a ttd model artefact: give an empty or new folder")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    bundle = load_model(config.model, config.pretrained, device=dev, seed=seed)
    model = bundle.model
    _, mean, std = geometry_and_norm(bundle.preprocess)
    images, tokens, _ = load_pairs(corpus_uri, bundle, config.max_samples,
                                   (lambda n: progress("load", n, 0)) if progress else None)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    log.info("pre-training %s on %d pairs: %d steps of %d (%.1f epochs)", config.model, n, config.steps, batch,
             config.steps * batch / n)
    gen = torch.Generator().manual_seed(seed)
    opt = adamw(param_groups(model, config.weight_decay), config.lr)
    loss_fn = open_clip.ClipLoss()
    data_fp = fingerprint([s.fingerprint for s in open_corpus(corpus_uri).shards()], n)
    fp = fingerprint("pretrain", config.model_dump(exclude=PRETRAIN_PERF_FIELDS), seed, data_fp)
    trainable = dict(model.named_parameters())
    resumed = checkpoints.load(out / CHECKPOINT_DIR, fp, trainable, opt)
    start, _, log_rows, extra = resumed or (0, 0, [], {})
    if resumed:
        log.info("resuming pre-training from its checkpoint at step %d", start)
    model.train()
    order = torch.randperm(n, generator=gen)
    cursor, window_t, window_n = 0, time.perf_counter(), 0
    for _ in range(start):  # the data order so far, replayed without computing: the same draws as a straight run
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        cursor += batch
    t0 = time.perf_counter()
    for step in range(start, config.steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        x = ((images[idx].float() / 255.0 - mean) / std).to(dev)
        out_f = model(x, tokens[idx].to(dev))
        img_f, txt_f, scale = (out_f["image_features"], out_f["text_features"], out_f["logit_scale"]) \
            if isinstance(out_f, dict) else out_f[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window_n += batch
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            now = time.perf_counter()
            log_rows.append({"step": step + 1, "epoch": (step + 1) * batch / n, "loss": loss.item(),
                             "loss_distill": None, "loss_tag": None, "loss_contrastive": loss.item(),
                             "lr": lr_at(step, config), "samples_per_s": window_n / max(now - window_t, 1e-9)})
            window_t, window_n = now, 0
            log.debug("step %d loss %.4f", step + 1, loss.item())
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            checkpoints.save(out / CHECKPOINT_DIR, step + 1, (step + 1) * batch, fp, trainable, opt, log_rows,
                             {"seconds": extra.get("seconds", 0.0) + time.perf_counter() - t0})
        if progress:
            progress("train", 1, loss.item())
    model.eval()
    seconds = extra.get("seconds", 0.0) + time.perf_counter() - t0
    meta = {"kind": "pretrain", "config": config.model_dump(), "seed": seed, "corpus": corpus_uri,
            "data_fingerprint": data_fp, "pairs": n, "ttd_version": __version__, "train_seconds": round(seconds, 1)}
    save_model(out, bundle, meta, fp16=config.fp16_weights)
    table = pa.Table.from_pylist(log_rows, schema=schemas.get("train_log").arrow)
    pq.write_table(schemas.get("train_log").conform(table), out / "train_log.parquet")
    checkpoints.remove(out / CHECKPOINT_DIR)  # the artefact is written: nothing to resume
    return {"out": str(out), "pairs": n, "steps": config.steps, "seconds": round(seconds, 1),
            "final_loss": log_rows[-1]["loss"], "samples_per_s": round(config.steps * batch / seconds, 1),
            "resumed_from": start or None}
