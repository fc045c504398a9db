"""`ttd distill`: TTD step 2, text-tag self-distillation, from the pseudo-labels the `score` stage stored.

For each training sample: its caption, its candidate tags with their selection (`relevancy.selected`) and the
selected tags' heatmaps (`masks`, min-max normalised by construction: quantised 0..255 over their own range).
Heatmaps here are cosine maps between the dense head's patch features and a text embedding. Losses (weights and
forms are configuration; docs/METHOD.md says what comes from the paper and what is ours):

- `L_distill`: the caption's heatmap against the union (pixel-wise max) of its selected tags' normalised maps;
- `L_tag`: each candidate tag's heatmap against its own normalised map when selected, a zero map when not;
- `L_contrastive` (optional): CLIP's loss on the batch's image and caption embeddings, to stay near pre-training.

The prediction is never min-max normalised (its maximum would always be 1 and a zero target could never be met,
which collapses the dense features): the target is mapped into the prediction's own current range [lo, hi], held
constant (no gradient), and compared with the raw map, scaled by `heatmap_scale`. A zero target then means "as
low as your lowest pixel", which can be met.

Data stream: shards in a seeded order per epoch, the store's rows for one shard at a time (filtered reads, never a
whole table), images decoded lazily, a seeded shuffle buffer. The stream is a pure function of (seed, epoch), so a
resumed run skips the samples already consumed (without decoding them) and continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.dataset as ds
import pydantic
import torch
import torch.nn.functional as F

from ttd import __version__
from ttd.config import Templates
from ttd.corpus import ReadIssue, open_corpus
from ttd.errors import ImageDecodeError, TTDError
from ttd.models.dense import HEADS, encode_image_dense
from ttd.models.loading import ARTEFACT_CONFIG, LORA_CONFIG, LORA_WEIGHTS, load_model, model_identity
from ttd.models.lora import TARGETS, TOWERS, add_lora, lora_state
from ttd.models.relevancy import encode_trimmed, trimmable
from ttd.stages.refresh import rescore
from ttd.store import schemas
from ttd.store.store import Store, fingerprint
from ttd.train import checkpoints
from ttd.train.checkpoints import CHECKPOINT_DIR
from ttd.train.pretrain import geometry_and_norm, lr_at, param_groups, save_artefact

log = logging.getLogger(__name__)

STAGE = "distill"
STAGE_VERSION = 1
_PERF_FIELDS = {"checkpoint_every", "log_every", "decode_threads"}
REFRESH_DIR = "refresh"  # inside an artefact folder: the intermediate rounds and their refreshed pseudo-labels
# fields added after artefacts existed: they enter the fingerprint only when set, so older artefacts keep theirs
_WHEN_SET_FIELDS = ("text_lora_rank", "text_lr", "refresh_rounds")


class DistillConfig(pydantic.BaseModel):
    """Every choice of the fine-tune. Defaults are ours unless docs/METHOD.md says they come from the paper."""

    model_config = pydantic.ConfigDict(extra="forbid")

    steps: int = pydantic.Field(300, ge=1, description="Optimiser steps.")
    batch_size: int = pydantic.Field(32, ge=1, description="Samples per optimiser step (over all accumulations).")
    grad_accum: int = pydantic.Field(1, ge=1, description="Micro-batches per step (batch_size / grad_accum each).")
    lr: float = pydantic.Field(1e-4, gt=0, description="Peak learning rate (5e-4 degraded pixel-tag F1 by 5 points "
                                                       "on TagMask-Synth, docs/BENCHMARKS.md).")
    weight_decay: float = pydantic.Field(0.01, ge=0)
    warmup_steps: int = pydantic.Field(30, ge=0)
    max_grad_norm: float = pydantic.Field(1.0, gt=0)
    lora: bool = pydantic.Field(True, description="LoRA on both towers; False: full fine-tuning.")
    lora_rank: int = pydantic.Field(8, ge=1)
    lora_alpha: float = pydantic.Field(16.0, gt=0)
    lora_towers: tuple[Literal[TOWERS], ...] = ("visual", "text")
    lora_targets: tuple[Literal[tuple(TARGETS)], ...] = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")
    lora_last_blocks: int | None = pydantic.Field(None, ge=1, description="Only the last N blocks of each tower.")
    text_lora_rank: int | None = pydantic.Field(None, ge=1, description="The text tower's own LoRA rank (its alpha "
                                                "scaled to keep alpha / rank); None: lora_rank.")
    text_lr: float | None = pydantic.Field(None, gt=0, description="The text tower's own peak learning rate; "
                                           "None: lr.")
    head: Literal[HEADS + ("scoring",)] = pydantic.Field(
        "maskclip", description="Dense head the heatmaps are trained through (maskclip: the one that scores and "
        "evaluates by default; chosen on val, docs/METHOD.md); 'scoring': the head that made the pseudo-labels "
        "(from the score stage's manifests), so student and teacher maps are the same function.")
    refresh_rounds: int = pydantic.Field(
        1, ge=0, le=5, description="Refresh the targets this many times: after a round of training, re-score the "
        "corpus with the fine-tuned model and train again from the base on the refreshed pseudo-labels (chosen on "
        "val, docs/METHOD.md); each round costs one training and one scoring of the corpus.")
    w_distill: float = pydantic.Field(1.0, ge=0)
    w_tag: float = pydantic.Field(1.0, ge=0)
    w_contrastive: float = pydantic.Field(0.1, ge=0)
    loss: Literal["mse", "l1"] = "mse"
    heatmap_scale: float = pydantic.Field(10.0, gt=0, description="Raw cosine differences are multiplied by this.")
    tag_target: Literal["teacher", "paper"] = pydantic.Field(
        "teacher", description="paper: L_tag pulls each tag's heatmap toward its own min-max-normalised pseudo-label "
                               "map (selected) or a zero map (unselected), both placed in the predicted map's own "
                               "range, every sample counted; teacher: toward the teacher's raw map (selected) or a "
                               "flat map at the sample's background level, the lowest value of its selected tags' "
                               "teacher maps (unselected), samples without a selected tag left out.")
    keep_contrast: bool = pydantic.Field(True, description="A range-relative target with a peak spans at least the "
                                         "least range of the sample's selected tags' teacher maps: flat maps cannot "
                                         "meet it (no collapse).")
    threshold: float | None = pydantic.Field(None, ge=0, le=1, description="Re-select tags by pixel_score >= this "
                                             "(only tags with a stored mask can be selected); None: the score "
                                             "stage's decisions.")
    union_threshold: float | None = pydantic.Field(
        0.5, ge=0, le=1, description="Binarise the union of the selected tags' maps at this value before L_distill "
                                     "(chosen on val, docs/METHOD.md); None: the soft union, as in the paper.")
    templates: Templates | None = pydantic.Field(
        ("a photo of a {}.",), description="Prompts of the tag embeddings; None: the score stage's (its manifests).")
    max_tags: int = pydantic.Field(24, ge=1, description="Candidates per caption used by L_tag (the first N).")
    shuffle_buffer: int = pydantic.Field(1000, ge=1)
    checkpoint_every: int = pydantic.Field(50, ge=1)
    log_every: int = pydantic.Field(10, ge=1, description="Steps between train_log rows and progress log lines.")
    decode_threads: int = pydantic.Field(2, ge=1)
    amp: bool = pydantic.Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    deterministic: bool = pydantic.Field(True, description="torch deterministic algorithms: same seed, same "
                                         "weights, and a resumed run equals an uninterrupted one.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.w_distill + self.w_tag + self.w_contrastive == 0:
            raise ValueError("all loss weights are zero: nothing to train")
        return self

    def result_config(self) -> dict[str, Any]:
        unset = {f for f in _WHEN_SET_FIELDS if not getattr(self, f)}
        return self.model_dump(mode="json", exclude=_PERF_FIELDS | unset)


# ---------------------------------------------------------------- losses

def _distance(pred: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    diff = pred - target
    return diff.pow(2) if form == "mse" else diff.abs()


def scaled_target(pred: torch.Tensor, target01: torch.Tensor, contrast: torch.Tensor | None = None) -> torch.Tensor:
    """A [0, 1] target map placed into each predicted map's own range: lo + t * max(hi - lo, contrast), per map,
    without gradient. `contrast` [N] (the teacher's own range for that map) keeps a flat map from meeting a
    target that has a peak: without it, flattening every map makes every loss zero (the collapse we measured)."""
    flat = pred.detach().flatten(-2)
    lo = flat.amin(-1)
    span = flat.amax(-1) - lo
    if contrast is not None:
        span = torch.maximum(span, contrast.to(span.dtype))
    return lo[..., None, None] + target01 * span[..., None, None]


def distill_loss(caption_maps: torch.Tensor, union: torch.Tensor, has_selected: torch.Tensor, *,
                 scale: float, form: str = "mse", contrast: torch.Tensor | None = None) -> torch.Tensor:
    """L_distill: caption heatmaps [B, h, w] against the union of their selected tags' maps [B, h, w]; samples
    without a selected tag [B] bool do not count. `contrast` [B]: the least range the caption map must span."""
    if not bool(has_selected.any()):
        return caption_maps.sum() * 0.0
    pred, union = caption_maps[has_selected], union[has_selected]
    floor = contrast[has_selected] if contrast is not None else None
    return _distance(pred * scale, scaled_target(pred, union, floor) * scale, form).mean()


def teacher_tag_targets(targets: torch.Tensor, lo: torch.Tensor, contrast: torch.Tensor, selected: torch.Tensor,
                        sample_of_tag: torch.Tensor, batch: int) -> torch.Tensor:
    """Raw-cosine targets for L_tag: a selected tag's teacher map (lo + t * contrast, exactly the stored map); an
    unselected tag's flat map at its sample's background level (the lowest `lo` of the sample's selected tags).
    Absolute levels, so an irrelevant tag cannot stay high by being flat, and a selected one cannot flatten."""
    background = torch.full((batch,), float("inf"), device=targets.device)
    sel = selected.nonzero().flatten()
    background.scatter_reduce_(0, sample_of_tag[sel], lo[sel], "amin")
    raw = lo[:, None, None] + targets * contrast[:, None, None]
    floor = background[sample_of_tag][:, None, None].expand_as(raw)
    return torch.where(selected[:, None, None], raw, floor)


def raw_tag_loss(tag_maps: torch.Tensor, raw_targets: torch.Tensor, *, scale: float, form: str = "mse"
                 ) -> torch.Tensor:
    """L_tag against absolute (raw cosine) targets; tags of samples without any selected tag do not count."""
    valid = torch.isfinite(raw_targets[:, 0, 0])
    if not bool(valid.any()):
        return tag_maps.sum() * 0.0
    return _distance(tag_maps[valid] * scale, raw_targets[valid] * scale, form).mean()


def tag_loss(tag_maps: torch.Tensor, targets: torch.Tensor, *, scale: float, form: str = "mse",
             contrast: torch.Tensor | None = None) -> torch.Tensor:
    """L_tag: each tag heatmap [M, h, w] against its own normalised map, or zeros for an unselected tag.
    `contrast` [M]: the least range each map must span (the teacher's range for a selected tag, 0 otherwise)."""
    if tag_maps.shape[0] == 0:
        return tag_maps.sum() * 0.0
    return _distance(tag_maps * scale, scaled_target(tag_maps, targets, contrast) * scale, form).mean()


def union_of_selected(targets: torch.Tensor, sample_of_tag: torch.Tensor, selected: torch.Tensor,
                      batch: int, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise max of each sample's selected tag maps: ([B, h, w], has_selected [B]); binarised at `threshold`
    when given (an ablation: the paper's target is the soft union)."""
    h, w = targets.shape[-2:]
    union = torch.zeros(batch, h, w, dtype=targets.dtype, device=targets.device)
    sel = selected.nonzero().flatten()
    if len(sel):
        flat = targets[sel].flatten(1)
        union.view(batch, -1).scatter_reduce_(0, sample_of_tag[sel][:, None].expand_as(flat), flat, "amax")
    has = torch.zeros(batch, dtype=torch.bool, device=targets.device)
    has[sample_of_tag[sel]] = True
    if threshold is not None:
        union = (union >= threshold).to(union.dtype)
    return union, has


# ---------------------------------------------------------------- data

class TrainItem:
    """One training sample: image (lazy), caption, candidate tags, selections and normalised target maps."""

    __slots__ = ("key", "sample", "caption", "tags", "selected", "maps", "lo", "contrast")

    def __init__(self, key, sample, caption, tags, selected, maps, lo, contrast):
        self.key, self.sample, self.caption = key, sample, caption
        self.tags, self.selected, self.maps, self.lo, self.contrast = tags, selected, maps, lo, contrast


def _shard_labels(store: Store, corpus: str, shard: str, config: DistillConfig) -> dict[str, dict]:
    """key -> {caption, tags, selected, maps} for one shard, read with partition filters."""
    where = (ds.field("corpus") == corpus) & (ds.field("shard") == shard)
    rel = store.read("relevancy", columns=["key", "tag_index", "text", "pixel_score", "selected"], filter=where)
    masks = store.read("masks", columns=["key", "tag_index", "height", "width", "heatmap", "vmin", "vmax"],
                       filter=where)
    caps = store.read("captions", columns=["key", "caption"], filter=where)
    maps: dict[tuple[str, int], tuple[np.ndarray, float, float]] = {}
    for k, i, h, w, data, lo, hi in zip(*(masks[c].to_pylist() for c in ("key", "tag_index", "height", "width",
                                                                           "heatmap", "vmin", "vmax"))):
        # 0..255 over its own range: /255 is the min-max normalised map; hi - lo is the teacher's contrast
        maps[(k, i)] = (np.frombuffer(data, np.uint8).reshape(h, w), float(lo), float(hi - lo))
    out: dict[str, dict] = {}
    for k, i, text, score, sel in zip(*(rel[c].to_pylist() for c in ("key", "tag_index", "text", "pixel_score",
                                                                       "selected"))):
        if config.threshold is not None:
            sel = score is not None and score >= config.threshold and (k, i) in maps
        sel = bool(sel) and (k, i) in maps
        entry = out.setdefault(k, {"order": [], "caption": None})
        entry["order"].append((i, text.lower(), sel, maps.get((k, i)) if sel else None))
    for k, c in zip(caps["key"].to_pylist(), caps["caption"].to_pylist()):
        if k in out:
            out[k]["caption"] = c
    for entry in out.values():
        entry["order"].sort(key=lambda t: t[0])
    return out


class DistillStream:
    """The training samples of a corpus's scored shards, as a deterministic stream for a seed."""

    def __init__(self, corpus, store: Store, shards: list, config: DistillConfig, seed: int):
        self.corpus, self.store, self.shards, self.config, self.seed = corpus, store, shards, config, seed

    def _epoch(self, epoch: int) -> Iterator[TrainItem]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards))
        buffer: list[TrainItem] = []
        for s in order.tolist():
            shard = self.shards[s]
            labels = _shard_labels(self.store, self.corpus.name, shard.name, self.config)
            for item in self.corpus.read_shard(shard):
                if isinstance(item, ReadIssue) or item.key not in labels:
                    continue
                lab = labels[item.key]
                tags = lab["order"][: self.config.max_tags]
                caption = lab["caption"] or item.caption or ""
                buffer.append(TrainItem(item.key, item, caption, [t[1] for t in tags], [t[2] for t in tags],
                                        [t[3][0] if t[3] else None for t in tags],
                                        [t[3][1] if t[3] else 0.0 for t in tags],
                                        [t[3][2] if t[3] else 0.0 for t in tags]))
                if len(buffer) >= self.config.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def items(self, skip: int = 0) -> Iterator[tuple[int, TrainItem]]:
        """(epoch, item) forever; the first `skip` items are passed over without decoding their images."""
        epoch, n = 0, 0
        while True:
            empty = True
            for item in self._epoch(epoch):
                empty = False
                if n >= skip:
                    yield epoch, item
                n += 1
            if empty:
                raise TTDError("no scored sample with candidate tags to train on: run `ttd score` first")
            epoch += 1


# ---------------------------------------------------------------- the model side

def _text_features(model, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings with gradients; tokens cut after the longest (exact under CLIP's causal mask)."""
    return encode_trimmed(model, tokens) if trimmable(model) else model.encode_text(tokens)


class Batch:
    def __init__(self, images, tokens, tag_prompts, sample_of_tag, uniq_of_tag, selected, targets, lo, contrast,
                 n_templates):
        self.images, self.tokens, self.tag_prompts = images, tokens, tag_prompts
        self.sample_of_tag, self.uniq_of_tag, self.selected, self.targets = (sample_of_tag, uniq_of_tag, selected,
                                                                             targets)
        self.lo, self.contrast, self.n_templates = lo, contrast, n_templates


def make_batch(items: list[TrainItem], bundle, config: DistillConfig, pool: ThreadPoolExecutor) -> Batch | None:
    """Decode and normalise the images, tokenise captions and the batch's distinct tags, stack the target maps
    (at the pseudo-labels' grid; resized to the model's in `losses`). None when no image decodes."""
    geo, mean, std = geometry_and_norm(bundle.preprocess)
    dev = bundle.device

    def decode(item: TrainItem):
        try:
            return torch.from_numpy(np.asarray(geo(item.sample.image()), dtype=np.uint8).copy()).permute(2, 0, 1)
        except ImageDecodeError as exc:
            log.warning("sample %s skipped: %s", item.key, exc)
            return None

    images = list(pool.map(decode, items))
    keep = [i for i, im in enumerate(images) if im is not None]
    if not keep:
        return None
    items = [items[i] for i in keep]
    x = torch.stack([images[i] for i in keep]).float().div_(255.0)
    x = ((x - mean) / std).to(dev)
    tokens = bundle.tokenizer([it.caption for it in items]).to(dev)
    uniq: dict[str, int] = {}
    sample_of_tag, uniq_of_tag, selected, targets, lo, contrast = [], [], [], [], [], []
    grid = None
    for b, it in enumerate(items):
        for tag, sel, m, low, c in zip(it.tags, it.selected, it.maps, it.lo, it.contrast):
            sample_of_tag.append(b)
            uniq_of_tag.append(uniq.setdefault(tag, len(uniq)))
            selected.append(sel)
            targets.append(m)
            lo.append(low if sel else 0.0)
            contrast.append(c if sel else 0.0)
            if m is not None and grid is None:
                grid = m.shape
    if grid is None:
        side = bundle.image_size // bundle.patch_size
        grid = (side, side)
    maps = torch.zeros(len(targets), *grid)
    for j, m in enumerate(targets):
        if m is None:
            continue
        t = torch.from_numpy(m.astype(np.float32) / 255.0)
        if t.shape != maps.shape[1:]:
            t = F.interpolate(t[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]
        maps[j] = t
    prompts = [t.format(tag) for tag in uniq for t in config.templates]
    prompt_tokens = bundle.tokenizer(prompts).to(dev) if prompts else torch.zeros(0, 1, dtype=torch.long, device=dev)
    return Batch(x, tokens, prompt_tokens, torch.tensor(sample_of_tag, dtype=torch.long, device=dev),
                 torch.tensor(uniq_of_tag, dtype=torch.long, device=dev),
                 torch.tensor(selected, dtype=torch.bool, device=dev), maps.to(dev),
                 torch.tensor(lo, dtype=torch.float32, device=dev),
                 torch.tensor(contrast, dtype=torch.float32, device=dev), len(config.templates))


def losses(model, batch: Batch, config: DistillConfig, clip_loss) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum for one micro-batch."""
    global_emb, dense = encode_image_dense(model, batch.images, config.head)
    dense = F.normalize(dense.float(), dim=-1)
    caption = F.normalize(_text_features(model, batch.tokens).float(), dim=-1)
    caption_maps = torch.einsum("bhwd,bd->bhw", dense, caption)
    out: dict[str, torch.Tensor] = {}
    zero = caption_maps.sum() * 0.0
    if len(batch.tag_prompts) and (config.w_tag or config.w_distill):
        tag_emb = _text_features(model, batch.tag_prompts).float()
        tag_emb = F.normalize(F.normalize(tag_emb, dim=-1).reshape(-1, batch.n_templates, tag_emb.shape[-1])
                              .mean(1), dim=-1)
        targets = batch.targets
        if targets.shape[-2:] != dense.shape[1:3]:
            targets = F.interpolate(targets[:, None], size=dense.shape[1:3], mode="bilinear",
                                    align_corners=False)[:, 0]
        tag_maps = torch.einsum("mhwd,md->mhw", dense[batch.sample_of_tag], tag_emb[batch.uniq_of_tag])
        union, has = union_of_selected(targets, batch.sample_of_tag, batch.selected, dense.shape[0],
                                       threshold=config.union_threshold)
        caption_contrast = None
        if config.keep_contrast:  # the caption map must span at least its selected tags' narrowest range
            sel = batch.selected.nonzero().flatten()
            caption_contrast = torch.full((dense.shape[0],), float("inf"), device=dense.device)
            caption_contrast.scatter_reduce_(0, batch.sample_of_tag[sel], batch.contrast[sel], "amin")
            caption_contrast = torch.where(torch.isfinite(caption_contrast), caption_contrast, 0.0)
        out["distill"] = distill_loss(caption_maps, union, has, scale=config.heatmap_scale, form=config.loss,
                                      contrast=caption_contrast)
        if config.tag_target == "teacher":  # ours
            raw = teacher_tag_targets(targets, batch.lo, batch.contrast, batch.selected, batch.sample_of_tag,
                                      dense.shape[0])
            out["tag"] = raw_tag_loss(tag_maps, raw, scale=config.heatmap_scale, form=config.loss)
        else:  # the paper's: own normalised map or zero, in the prediction's own range
            out["tag"] = tag_loss(tag_maps, targets, scale=config.heatmap_scale, form=config.loss,
                                  contrast=batch.contrast if config.keep_contrast else None)
    else:
        out["distill"] = out["tag"] = zero
    if config.w_contrastive:
        out["contrastive"] = clip_loss(F.normalize(global_emb.float(), dim=-1), caption, model.logit_scale.exp())
    else:
        out["contrastive"] = zero
    out["loss"] = (config.w_distill * out["distill"] + config.w_tag * out["tag"]
                   + config.w_contrastive * out["contrastive"])
    return out


# ---------------------------------------------------------------- the stage

def _data_fingerprint(store: Store, corpus_name: str) -> tuple[str, list[str]]:
    """Fingerprint of the pseudo-labels: the committed score manifests of the corpus (fingerprint per shard)."""
    done = sorted((m["shard"], m["fingerprint"]) for m in store.manifests("score") if m.get("corpus") == corpus_name)
    if not done:
        raise TTDError(f"the store has no scored shard of corpus {corpus_name!r}: run `ttd score` first")
    return fingerprint(done), [s for s, _ in done]


def _artefact_fingerprint(out: Path) -> str | None:
    for name in (LORA_CONFIG, ARTEFACT_CONFIG):
        try:
            doc = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if doc.get("kind") in ("lora", "distill"):
            return doc.get("fingerprint")
    return None


def with_scoring_settings(config: DistillConfig, store: Store, corpus_name: str) -> DistillConfig:
    """`head: scoring` and `templates: None` filled in from the score stage's manifests of this corpus (the head
    and prompts that made the pseudo-labels); refused when its shards were scored with different ones."""
    if config.head != "scoring" and config.templates is not None:
        return config
    used = {(m["config"]["head"], tuple(m["config"]["templates"])) for m in store.manifests("score")
            if m.get("corpus") == corpus_name and m.get("config")}
    if len(used) != 1:
        raise TTDError(f"distill with head 'scoring' or the scoring templates needs one score configuration for "
                       f"corpus {corpus_name!r}; its shards were scored with {len(used)}: give --head and templates")
    head, templates = used.pop()
    return config.model_copy(update={"head": head if config.head == "scoring" else config.head,
                                     "templates": templates if config.templates is None else config.templates})


def _scored_corpus(corpus_uri: str, store_uri: str, name: str | None) -> tuple[Any, Store]:
    """The corpus and the store its pseudo-labels are in; refused when the store knows that name as another
    corpus (training would read one corpus's images against another's labels)."""
    corpus = open_corpus(corpus_uri, name=name)
    store = Store(store_uri)
    store.check_corpus(corpus.name, corpus.uri)
    return corpus, store


def run_distill(corpus_uri: str, store_uri: str, out_uri: str, config: DistillConfig | None = None, *,
                model: str | None = None, pretrained: str | None = None, seed: int = 0, device: str | None = None,
                progress: Callable[[int, dict[str, float]], None] | None = None, rank: int = 0,
                world: int = 1, corpus_name: str | None = None) -> dict[str, Any]:
    """Fine-tune and write the artefact at `out_uri` (a local folder); returns a summary.

    With `refresh_rounds` R > 0, R + 1 rounds: each trains from the base model, the first on the store's
    pseudo-labels, every later one on the corpus re-scored by the round before (`ttd.stages.refresh`; the intermediate
    rounds' artefacts and refreshed stores are kept under `out_uri/refresh/`, the store is never written to but
    for the training logs). `progress` counts the steps of all rounds.

    Data-parallel (`world` > 1, one call per rank inside an initialised torch.distributed group, as Ray Train's
    workers are): every rank reads the same stream and trains on its share of each batch; gradients are averaged
    across ranks before each step, so the weights stay identical on every rank; rank 0 alone writes (and
    re-scores between rounds while the other ranks wait).

    Skipped when `out_uri` already holds an artefact with this run's fingerprint. A checkpoint is written every
    `checkpoint_every` steps under `out_uri/checkpoint/`; a re-run with the same inputs resumes from it exactly
    (a finished round is not trained again; a refresh continues shard by shard)."""
    t0 = time.perf_counter()
    config = config or DistillConfig()
    if out_uri.startswith("file://"):
        out_uri = out_uri[len("file://"):]
    if "://" in out_uri:
        raise TTDError("--out must be a local folder (artefacts are loaded from local paths)")
    out = Path(out_uri)
    corpus, store = _scored_corpus(corpus_uri, store_uri, corpus_name)
    config = with_scoring_settings(config, store, corpus.name)
    data_fp, shard_names = _data_fingerprint(store, corpus.name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_id = model_identity(model, pretrained)  # planning needs the identity only: the model loads if there is work
    fp = fingerprint(STAGE, STAGE_VERSION, config.result_config(), model_id, data_fp, seed)
    if _artefact_fingerprint(out) == fp:
        return {"artefact": str(out), "skipped": True, "fingerprint": fp, "seconds": round(time.perf_counter() - t0, 2)}
    if out.exists() and any(out.iterdir()) and _artefact_fingerprint(out) is None \
            and not (out / CHECKPOINT_DIR).exists() and not (out / REFRESH_DIR).exists():
        raise TTDError(f"--out {out_uri!r} exists and is not a ttd distill artefact: give an empty or new folder")
    # as given (None, None: the embedded base model), so `--lora OUT` alone reloads exactly this base
    base = {"name": model, "pretrained": str(Path(pretrained).resolve()) if pretrained and
            Path(pretrained).exists() else pretrained, "model_id": model_id}
    labels, refreshed = store, []
    one_round = config.model_copy(update={"refresh_rounds": 0})
    for r in range(1, config.refresh_rounds + 1):
        done = (r - 1) * config.steps  # steps of the rounds before, for `progress`
        teacher = out / REFRESH_DIR / f"round-{r}"
        run_distill(corpus_uri, labels.uri, str(teacher), one_round, model=model, pretrained=pretrained, seed=seed,
                    device=device, progress=(lambda n, s, d=done: progress(d + n, s)) if progress else None,
                    rank=rank, world=world, corpus_name=corpus.name)
        target = out / REFRESH_DIR / f"labels-{r}"
        if rank == 0:
            log.info("round %d of %d: re-scoring %s with %s", r, config.refresh_rounds + 1, corpus.name, teacher)
            rescore(corpus_uri, corpus.name, shard_names, store, str(teacher), str(target), model=model,
                    pretrained=pretrained, device=str(dev))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's refreshed pseudo-labels
        labels = Store(str(target))
        refreshed.append({"round": r, "teacher": str(teacher), "labels": str(target)})
    shift = config.refresh_rounds * config.steps
    result = _train_round(
        corpus, labels, out, one_round, fp=fp, data_fp=data_fp, model=model, pretrained=pretrained, seed=seed,
        dev=dev, progress=(lambda n, s: progress(shift + n, s)) if progress else None, rank=rank, world=world,
        meta={"base": base, "config": config.model_dump(mode="json"), "corpus": corpus_uri, "store": store_uri,
              "refreshed": refreshed},
        log_store=store, log_config=config)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _train_round(corpus, labels: Store, out: Path, config: DistillConfig, *, fp: str, data_fp: str,
                 model: str | None, pretrained: str | None, seed: int, dev: torch.device,
                 progress: Callable[[int, dict[str, float]], None] | None, rank: int, world: int,
                 meta: dict[str, Any], log_store: Store, log_config: DistillConfig) -> dict[str, Any]:
    """One round: train from the base on `labels`' pseudo-labels, write the artefact (fingerprint `fp`) at `out`
    and commit the training log to `log_store`."""
    t0 = time.perf_counter()
    labelled = {m["shard"] for m in labels.manifests("score") if m.get("corpus") == corpus.name}
    shards = [s for s in corpus.shards() if s.name in labelled]
    torch.manual_seed(seed)
    bundle = load_model(model, pretrained, device=dev)

    net = bundle.model
    if config.lora:
        deltas = add_lora(net, rank=config.lora_rank, alpha=config.lora_alpha, towers=config.lora_towers,
                          targets=config.lora_targets, last_blocks=config.lora_last_blocks, seed=seed,
                          tower_ranks=_tower_ranks(config))
        trainable = {f"{n}.{k}": getattr(d, k) for n, d in deltas.items() for k in ("lora_A", "lora_B")}
        groups = _lora_groups(trainable, config)
    else:
        deltas = {}
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        groups = param_groups(net, config.weight_decay)
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    resumed = checkpoints.load(out / CHECKPOINT_DIR, fp, trainable, opt)
    start, consumed, log_rows, _ = resumed or (0, 0, [], {})
    if resumed:
        log.info("resuming %s from step %d", out, start)

    stream = DistillStream(corpus, labels, shards, config, seed).items(skip=consumed)
    pool = ThreadPoolExecutor(config.decode_threads)
    clip_loss = open_clip.ClipLoss()
    micro = config.batch_size // config.grad_accum
    autocast = dev.type == "cuda" and config.amp

    def next_batch() -> tuple[Batch, int]:
        nonlocal consumed
        while True:
            items, epoch = [], 0
            while len(items) < micro:
                epoch, item = next(stream)
                consumed += 1
                items.append(item)
            batch = make_batch(items[rank::world], bundle, config, pool)
            if batch is not None:
                return batch, epoch

    net.train()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:  # CPU float reductions otherwise differ run to run (1e-7): resume would not be exact
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    window_t, window_n, epoch = time.perf_counter(), 0, 0
    last: dict[str, float] = {}
    try:
        for step in range(start, config.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, config) * group.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "distill": 0.0, "tag": 0.0, "contrastive": 0.0}
            for _ in range(config.grad_accum):
                batch, epoch = next_batch()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    terms = losses(net, batch, config, clip_loss)
                (terms["loss"] / config.grad_accum).backward()
                for k in sums:
                    sums[k] += float(terms[k].detach()) / config.grad_accum
                window_n += batch.images.shape[0]
            if world > 1:
                sums = _average_across_ranks(trainable, sums, world)
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            opt.step()
            if not config.lora:
                with torch.no_grad():
                    net.logit_scale.clamp_(0, math.log(100))
            last = sums
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                now = time.perf_counter()
                log_rows.append({"step": step + 1, "epoch": float(epoch), "loss": sums["loss"],
                                 "loss_distill": sums["distill"], "loss_tag": sums["tag"],
                                 "loss_contrastive": sums["contrastive"], "lr": lr_at(step, config),
                                 "samples_per_s": window_n / max(now - window_t, 1e-9)})
                log.info("step %d/%d: loss %.4f (distill %.4f, tag %.4f, contrastive %.4f), %.1f samples/s", step + 1,
                         config.steps, sums["loss"], sums["distill"], sums["tag"], sums["contrastive"],
                         log_rows[-1]["samples_per_s"])
                window_t, window_n = now, 0
            if rank == 0 and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoints.save(out / CHECKPOINT_DIR, step + 1, consumed, fp, trainable, opt, log_rows)
            if progress and rank == 0:
                progress(step + 1, sums)
    finally:
        pool.shutdown(wait=False)
        torch.use_deterministic_algorithms(deterministic)
    net.eval()
    seconds = time.perf_counter() - t0
    meta = {"fingerprint": fp, **meta, "seed": seed, "corpus_name": corpus.name, "data_fingerprint": data_fp,
            "steps": config.steps, "ttd_version": __version__, "train_seconds": round(seconds, 1)}
    result = {"artefact": str(out), "skipped": False, "fingerprint": fp, "steps": config.steps,
              "resumed_from": start, "final": {k: round(v, 5) for k, v in last.items()}, "seconds": round(seconds, 1),
              "world": world}
    if rank != 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    if config.lora:
        from safetensors.torch import save_file

        tmp = out / (LORA_WEIGHTS + ".tmp")
        save_file(lora_state(deltas), str(tmp), metadata={"ttd_version": __version__})
        tmp.replace(out / LORA_WEIGHTS)
        spec = {"rank": config.lora_rank, "alpha": config.lora_alpha, "towers": list(config.lora_towers),
                "targets": list(config.lora_targets), "last_blocks": config.lora_last_blocks,
                "tower_ranks": _tower_ranks(config)}
        tmp_json = out / (LORA_CONFIG + ".tmp")
        tmp_json.write_text(json.dumps({"kind": "lora", "lora": spec, **meta}, indent=2, sort_keys=True))
        tmp_json.replace(out / LORA_CONFIG)  # last: the artefact's commit point
    else:
        save_artefact(out, bundle, {"kind": "distill", **meta})
    table = pa.Table.from_pylist(log_rows, schema=schemas.get("train_log").arrow)
    log_store.commit(STAGE, {"run": fp}, fp, {"train_log": table}, stage_version=STAGE_VERSION,
                     config={**log_config.result_config(), "seed": seed, "artefact": str(out)},
                     model_id=bundle.model_id, input_fingerprint=data_fp)
    checkpoints.remove(out / CHECKPOINT_DIR)
    return result


def _tower_ranks(config: DistillConfig) -> dict[str, int] | None:
    return {"text": config.text_lora_rank} if config.text_lora_rank else None


def _lora_groups(trainable: dict[str, torch.nn.Parameter], config: DistillConfig) -> list[dict]:
    """One AdamW group, or one per tower when the text tower has its own lr; `lr_scale` is a group's peak lr
    relative to `lr` (the schedule multiplies it)."""
    if not config.text_lr:
        return [{"params": list(trainable.values()), "weight_decay": config.weight_decay}]
    groups = []
    for tower in TOWERS:
        params = [p for n, p in trainable.items() if n.split(".", 1)[0] == tower]
        peak = config.text_lr if tower == "text" and config.text_lr else config.lr
        if params:
            groups.append({"params": params, "weight_decay": config.weight_decay, "lr_scale": peak / config.lr})
    return groups


def _average_across_ranks(trainable: dict[str, torch.nn.Parameter], sums: dict[str, float],
                          world: int) -> dict[str, float]:
    """All-reduce (mean) every gradient and the logged loss terms over the data-parallel group."""
    import torch.distributed as dist

    for p in trainable.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    values = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=next(iter(trainable.values())).device)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(sums, values)}



@torch.no_grad()
def validation_losses(corpus_uri: str, store_uri: str, config: DistillConfig | None = None, *,
                      model: str | None = None, pretrained: str | None = None, lora: str | None = None,
                      max_samples: int = 256, device: str | None = None, corpus_name: str | None = None
                      ) -> dict[str, float]:
    """Mean loss terms of a model (base, or with a LoRA artefact) on a scored corpus, without training: a
    held-out check that distillation generalises. Samples in the stream's order for seed 0."""
    config = config or DistillConfig()
    corpus, store = _scored_corpus(corpus_uri, store_uri, corpus_name)
    config = with_scoring_settings(config, store, corpus.name)
    _, shard_names = _data_fingerprint(store, corpus.name)
    shards = [s for s in corpus.shards() if s.name in set(shard_names)]
    bundle = load_model(model, pretrained, device=torch.device(device or "cpu"), lora=lora)
    pool = ThreadPoolExecutor(config.decode_threads)
    clip_loss = open_clip.ClipLoss()
    totals: dict[str, float] = {}
    n = 0

    def flush(items: list[TrainItem]) -> int:
        batch = make_batch(items, bundle, config, pool)
        if batch is None:
            return 0
        terms = losses(bundle.model, batch, config, clip_loss)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v) * batch.images.shape[0]
        return batch.images.shape[0]

    items: list[TrainItem] = []
    for epoch, item in DistillStream(corpus, store, shards, config, 0).items():
        if epoch > 0 or n + len(items) >= max_samples:  # one pass, at most max_samples
            break
        items.append(item)
        if len(items) == config.batch_size:
            n += flush(items)
            items = []
    if items:
        n += flush(items)
    pool.shutdown()
    return {k: v / max(n, 1) for k, v in totals.items()} | {"samples": n}
