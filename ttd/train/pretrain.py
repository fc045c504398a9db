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

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import torch
from torchvision import transforms as T

from ttd import __version__
from ttd.corpus import ReadIssue, open_corpus
from ttd.errors import ImageDecodeError, TTDError
from ttd.models.loading import ARTEFACT_CONFIG, ARTEFACT_WEIGHTS, load_model
from ttd.store import schemas
from ttd.store.store import fingerprint
from ttd.train import checkpoints
from ttd.train.checkpoints import CHECKPOINT_DIR

log = logging.getLogger(__name__)


class PretrainConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "ttd-tiny"
    pretrained: str | None = pydantic.Field(None, description="Start from these weights (a ttd model artefact "
                                            "folder or a weights file for `model`) instead of random ones.")
    steps: int = pydantic.Field(4000, ge=1)
    batch_size: int = pydantic.Field(128, ge=2)
    lr: float = pydantic.Field(1e-3, gt=0)
    weight_decay: float = pydantic.Field(0.1, ge=0)
    warmup_steps: int = pydantic.Field(200, ge=0)
    max_samples: int | None = pydantic.Field(None, ge=2)
    log_every: int = pydantic.Field(50, ge=1)
    checkpoint_every: int = pydantic.Field(200, ge=1, description="Steps between checkpoints (resume after a kill).")
    fp16_weights: bool = False  # store weights in fp16 (halves the artefact; the shipped default model uses it)


_PERF_FIELDS = {"log_every", "checkpoint_every"}  # leave the weights as they are: not part of a run's identity


PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on a 2-core CPU: enough for tests and a demo to have a model that is better than random
    "quick": {"steps": 300, "batch_size": 64, "warmup_steps": 30},
    # the embedded default base model shipped in the package (ttd/models/embedded): 2,000 steps of 128 (about
    # 50 min on 2 idle CPU cores; a 4,000-step schedule already passed issue 16's targets at step 1,600) at a peak
    # lr of 3e-4, stored in fp16. At 1e-3 the dense (patch) features, which pixel-tag scoring reads, collapsed
    # after ~1,000 steps while the contrastive loss kept falling (docs/BENCHMARKS.md, "Base model (issue 16)").
    "embedded": {"steps": 2000, "lr": 3e-4, "fp16_weights": True},
    # the same recipe without fp16 storage
    "default": {"lr": 3e-4},
}


def preset(name: str, **overrides: Any) -> PretrainConfig:
    if name not in PRESETS:
        raise TTDError(f"unknown pretrain preset {name!r}: use one of {', '.join(PRESETS)}")
    return PretrainConfig(**{**PRESETS[name], **overrides})


def geometry_and_norm(preprocess) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """Split open_clip's preprocessing into the geometric part (run once) and Normalize (run per batch)."""
    geo, mean, std = [], None, None
    for t in preprocess.transforms:
        if isinstance(t, T.Normalize):
            mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
        elif isinstance(t, (T.Resize, T.CenterCrop)):
            geo.append(t)
    if mean is None:
        raise TTDError("model preprocessing has no Normalize step; cannot pre-train it")
    return T.Compose(geo), mean, std


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


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on gains, biases, embeddings and the temperature (the usual CLIP recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def save_artefact(out: Path, bundle, meta: dict[str, Any], fp16: bool = False) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
             for k, v in bundle.model.state_dict().items()}
    tmp = out / (ARTEFACT_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"ttd_version": __version__})
    tmp.replace(out / ARTEFACT_WEIGHTS)
    cfg = open_clip.get_model_config(bundle.name)
    (out / ARTEFACT_CONFIG).write_text(json.dumps({"model": bundle.name, "model_cfg": cfg, **meta}, indent=2,
                                                  sort_keys=True, default=str))


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
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    data_fp = fingerprint([s.fingerprint for s in open_corpus(corpus_uri).shards()], n)
    fp = fingerprint("pretrain", config.model_dump(exclude=_PERF_FIELDS), seed, data_fp)
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
    save_artefact(out, bundle, meta, fp16=config.fp16_weights)
    table = pa.Table.from_pylist(log_rows, schema=schemas.get("train_log").arrow)
    pq.write_table(schemas.get("train_log").conform(table), out / "train_log.parquet")
    checkpoints.remove(out / CHECKPOINT_DIR)  # the artefact is written: nothing to resume
    return {"out": str(out), "pairs": n, "steps": config.steps, "seconds": round(seconds, 1),
            "final_loss": log_rows[-1]["loss"], "samples_per_s": round(config.steps * batch / seconds, 1),
            "resumed_from": start or None}
