"""The distillation data: each training sample's image (decoded lazily), caption, candidate tags, their selection
and target maps, read from the store's pseudo-labels one shard at a time (filtered reads, never a whole table), as a
deterministic stream; and batches of them on the device.

The stream is a pure function of (seed, epoch): shards in a seeded order per epoch, a seeded shuffle buffer, so a
resumed run skips the samples already consumed (without decoding them) and continues bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F

from ttd.configs import DistillConfig
from ttd.corpus import ReadIssue
from ttd.errors import ImageDecodeError, TTDError
from ttd.store.store import Store
from ttd.train.recipe import geometry_and_norm

log = logging.getLogger(__name__)


class TrainItem:
    """One training sample: image (lazy), caption, candidate tags, selections and normalised target maps."""

    __slots__ = ("key", "sample", "caption", "tags", "selected", "maps", "lo", "contrast")

    def __init__(self, key, sample, caption, tags, selected, maps, lo, contrast):
        self.key, self.sample, self.caption = key, sample, caption
        self.tags, self.selected, self.maps, self.lo, self.contrast = tags, selected, maps, lo, contrast


def shard_labels(store: Store, corpus: str, shard: str, config: DistillConfig) -> dict[str, dict]:
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
            labels = shard_labels(self.store, self.corpus.name, shard.name, self.config)
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
