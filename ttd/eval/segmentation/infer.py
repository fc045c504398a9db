"""Open-vocabulary segmentation inference: sliding windows at several scales with flip, batched across images,
cosine logits against prompt-ensembled class names, PAMR refinement, background by threshold.

Per chunk of `images_per_step` images (the stream keeps memory bounded):

1. resize each image so its short side is `short_side` (the *base* resolution) and normalise it as the model does;
2. for every scale and flip, a *view* of the image; every view is cut into `window` x `window` crops every `stride`
   pixels (mmseg's slide grid: the last row/column of windows is pushed back inside the image; a view smaller than
   the window is one window of its own size). Crops of the same size from all views of all images in the chunk go
   through `encode_image_dense` together, `batch_size` at a time;
3. each crop's patch features -> cosine logits per class (max over a class's comma-separated synonyms) -> bilinear
   upsampling to the crop's pixels; overlapping windows are averaged, the view is flipped back and resized to the
   base resolution, and the views are averaged (logits, not probabilities);
4. probabilities = softmax(logits / temperature) over the text-embedded classes; PAMR refines them with the base
   image's local colour affinities; they are resized to the label's size; then argmax, and where the dataset has
   a background class, pixels whose best foreground probability is below `bg_threshold` become background (0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ttd.configs import SEGEVAL_PERF_FIELDS, SegEvalConfig
from ttd.eval.segmentation.datasets import get_spec
from ttd.models.dense import encode_image_dense
from ttd.models.relevancy import encode_tags

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

DenseFn = Callable[[torch.Tensor], torch.Tensor]  # [B, 3, h, w] normalised -> [B, gh, gw, D]
T = TypeVar("T")


def resolve_config(config: SegEvalConfig, dataset: str) -> SegEvalConfig:
    """Fill the dataset's default background threshold (0.40 or 0.45) where the config leaves it open."""
    if config.bg_threshold is not None:
        return config
    return config.model_copy(update={"bg_threshold": get_spec(dataset).bg_threshold})


def result_config(config: SegEvalConfig) -> dict:
    return config.model_dump(mode="json", exclude=SEGEVAL_PERF_FIELDS)


# ---- geometry --------------------------------------------------------------------------------------------------------
def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) of every window; the last ones are pushed back inside, so all but tiny views get full windows."""
    def starts(size: int) -> list[int]:
        n = max(size - window + stride - 1, 0) // stride + 1
        return sorted({max(min(i * stride, size - window), 0) for i in range(n)})

    return [(y, x, min(window, height), min(window, width)) for y in starts(height) for x in starts(width)]


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a [C, H, W] map."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]


def short_side_size(height: int, width: int, short: int | None) -> tuple[int, int]:
    if short is None:
        return height, width
    s = short / min(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def scaled_size(height: int, width: int, scale: float, patch: int) -> tuple[int, int]:
    """A view's size; never below one patch, or the dense head has no token to give."""
    return max(patch, round(height * scale)), max(patch, round(width * scale))


def chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    buf: list[T] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ---- class logits ----------------------------------------------------------------------------------------------------
class TextClassifier:
    """Cosine logits of dense features against class text embeddings; a class with several synonyms takes their max."""

    def __init__(self, embeddings: torch.Tensor, owner: Sequence[int], num_classes: int):
        self.emb = F.normalize(embeddings.float(), dim=-1)
        self.owner = torch.as_tensor(list(owner), dtype=torch.long, device=self.emb.device)
        self.num_classes = num_classes
        self._plain = len(owner) == num_classes and bool((self.owner == torch.arange(num_classes,
                                                                                      device=self.emb.device)).all())

    @classmethod
    def from_names(cls, bundle, names: Sequence[str], templates: tuple[str, ...]) -> TextClassifier:
        synonyms = [[s.strip() for s in name.split(",") if s.strip()] or [name] for name in names]
        flat = [s for syn in synonyms for s in syn]
        owner = [c for c, syn in enumerate(synonyms) for _ in syn]
        emb = encode_tags(bundle, flat, templates).to(bundle.device)
        return cls(emb, owner, len(names))

    def __call__(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, gh, gw, D] -> [B, C, gh, gw]."""
        logits = torch.einsum("bhwd,sd->bshw", F.normalize(dense.float(), dim=-1), self.emb)
        if self._plain:
            return logits
        b, _, h, w = logits.shape
        out = logits.new_full((b, self.num_classes, h, w), float("-inf"))
        index = self.owner.view(1, -1, 1, 1).expand_as(logits)
        return out.scatter_reduce(1, index, logits, reduce="amax")


# ---- sliding windows over many views at once -------------------------------------------------------------------------
@dataclass
class _View:
    image: int  # index in the chunk
    scale: float
    flip: bool
    pixels: torch.Tensor | None = None  # [3, h, w], made when its first window is cut
    acc: torch.Tensor | None = None
    cnt: torch.Tensor | None = None
    pending: int = 0
    boxes: list = field(default_factory=list)


def _pad_to_patch(crop: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero padding (the mean colour after normalisation) up to whole patches; the padded logits are cut off."""
    h, w = crop.shape[-2:]
    ph, pw = -h % patch, -w % patch
    return F.pad(crop, (0, pw, 0, ph)) if ph or pw else crop


def multiscale_logits(images: Sequence[torch.Tensor], dense_fn: DenseFn, classify: Callable, *, scales: Sequence[float],
                      flip: bool, window: int, stride: int, patch: int, batch_size: int) -> list[torch.Tensor]:
    """Averaged class logits [C, H, W] of each normalised image [3, H, W], over scales, flips and windows.

    Windows are batched in view order, consecutive windows of equal size sharing a forward, and a view's
    accumulator lives only until its last window is done: memory is a few views, not every view of the chunk."""
    views = [_View(i, s, f) for s in sorted(scales, reverse=True) for i in range(len(images))
             for f in ((False, True) if flip else (False,))]
    sizes = [tuple(img.shape[-2:]) for img in images]
    for v in views:
        h, w = scaled_size(*sizes[v.image], v.scale, patch)
        v.boxes = window_boxes(h, w, window, stride)
        v.pending = len(v.boxes)
    out: list[torch.Tensor | None] = [None] * len(images)

    def materialise(v: _View) -> None:
        img = images[v.image]
        px = resize(img, scaled_size(*sizes[v.image], v.scale, patch), antialias=v.scale < 1)
        v.pixels = px.flip(-1) if v.flip else px

    def finish(v: _View) -> None:
        logits = v.acc / v.cnt
        logits = resize(logits.flip(-1) if v.flip else logits, sizes[v.image])
        out[v.image] = logits if out[v.image] is None else out[v.image] + logits
        v.pixels = v.acc = v.cnt = None

    def run(batch: list[tuple[_View, tuple[int, int, int, int]]]) -> None:
        crops = torch.stack([_pad_to_patch(v.pixels[:, y:y + h, x:x + w], patch) for v, (y, x, h, w) in batch])
        logits = classify(dense_fn(crops))
        logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        for j, (v, (y, x, h, w)) in enumerate(batch):
            if v.acc is None:
                v.acc = logits.new_zeros((logits.shape[1], *v.pixels.shape[-2:]))
                v.cnt = logits.new_zeros((1, *v.pixels.shape[-2:]))
            v.acc[:, y:y + h, x:x + w] += logits[j, :, :h, :w]
            v.cnt[:, y:y + h, x:x + w] += 1
            v.pending -= 1
            if v.pending == 0:
                finish(v)

    batch: list = []
    for v in views:
        for box in v.boxes:
            shape = _padded(box, patch)
            if batch and (len(batch) == batch_size or _padded(batch[0][1], patch) != shape):
                run(batch)
                batch = []
            if v.pixels is None:
                materialise(v)
            batch.append((v, box))
    if batch:
        run(batch)
    n = len(views) // len(images)
    return [o / n for o in out]


def _padded(box: tuple[int, int, int, int], patch: int) -> tuple[int, int]:
    return box[2] + (-box[2] % patch), box[3] + (-box[3] % patch)


# ---- PAMR ------------------------------------------------------------------------------------------------------------
def _neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbours of a 3x3 kernel at each dilation (the centre is left out: a pixel learns from others)."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int], sigma: float) -> torch.Tensor:
    """[K, H, W] weights over the K neighbours of every pixel, summing to 1: a softmax over neighbours of
    -|I_i - I_j| / (sigma * std_i), averaged over colour channels, std_i the local std of the colours."""
    h, w = image.shape[-2:]
    pad = max(dilations)
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="replicate")[0]
    neigh = torch.stack([_shifted(padded, pad, dy, dx, h, w) for dy, dx in _neighbour_offsets(dilations)])
    std = torch.cat([image[None], neigh]).std(dim=0, unbiased=False)  # [3, H, W]
    kappa = -(neigh - image[None]).abs() / (sigma * std[None] + 1e-8)
    return torch.softmax(kappa.mean(dim=1), dim=0)


def pamr(image: torch.Tensor, probs: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
         iterations: int = 10, sigma: float = 0.1) -> torch.Tensor:
    """Pixel-adaptive mask refinement: `iterations` rounds of replacing each pixel's class probabilities [C, H, W]
    by the affinity-weighted mean of its neighbours' (affinities from the image [3, H, W], fixed across rounds).
    Weights sum to 1, so a constant map stays constant and probabilities stay normalised."""
    if iterations == 0:
        return probs
    h, w = probs.shape[-2:]
    image = resize(image.float(), (h, w), antialias=True)
    aff = pamr_affinity(image, dilations, sigma)
    pad = max(dilations)
    offsets = _neighbour_offsets(dilations)
    for _ in range(iterations):
        padded = F.pad(probs[None], (pad, pad, pad, pad), mode="replicate")[0]
        new = torch.zeros_like(probs)
        for k, (dy, dx) in enumerate(offsets):
            new.addcmul_(aff[k], _shifted(padded, pad, dy, dx, h, w))  # in place: no temporary per neighbour
        probs = new
    return probs


# ---- decisions -------------------------------------------------------------------------------------------------------
def decide(probs: torch.Tensor, has_background: bool, threshold: float | None) -> torch.Tensor:
    """Class ids [H, W] from probabilities [C, H, W] over the text-embedded classes. With a background class the
    embedded classes are 1..C and a pixel whose best probability is below `threshold` becomes 0."""
    conf, idx = probs.max(dim=0)
    if not has_background:
        return idx
    pred = idx + 1
    if threshold is not None:
        pred[conf < threshold] = 0
    return pred


def mean_std(bundle, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's normalisation, [3, 1, 1] each (OpenAI CLIP's when the model does not say)."""
    cfg = getattr(bundle.model.visual, "preprocess_cfg", None) or {}
    return (torch.tensor(cfg.get("mean", OPENAI_MEAN), device=device).view(3, 1, 1),
            torch.tensor(cfg.get("std", OPENAI_STD), device=device).view(3, 1, 1))


def image_tensor(image, device: torch.device) -> torch.Tensor:
    """A PIL image as floats [3, H, W] in [0, 1] on `device`."""
    arr = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
    return torch.from_numpy(arr).to(device).permute(2, 0, 1).float().div_(255)


# ---- the segmenter ---------------------------------------------------------------------------------------------------
class Segmenter:
    """A model + class list + protocol: streams images in, class-id maps out."""

    def __init__(self, bundle, class_names: Sequence[str], has_background: bool, config: SegEvalConfig):
        self.bundle = bundle
        self.config = config
        self.device = bundle.device
        self.has_background = has_background
        names = list(class_names[1:] if has_background else class_names)  # background is the threshold's job
        self.classify = TextClassifier.from_names(bundle, names, config.templates)
        self.mean, self.std = mean_std(bundle, self.device)
        self.amp = config.amp and self.device.type == "cuda"

    @torch.inference_mode()
    def dense(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            _, dense = encode_image_dense(self.bundle.model, images, self.config.head)
        return dense.float()

    def _to_tensor(self, image) -> torch.Tensor:
        return image_tensor(image, self.device)

    @torch.inference_mode()
    def logits(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Averaged logits at base resolution for images [3, H, W] in [0, 1], already at base resolution."""
        cfg = self.config
        normed = [(img - self.mean) / self.std for img in images]
        return multiscale_logits(normed, self.dense, self.classify, scales=cfg.scales, flip=cfg.flip,
                                 window=cfg.window, stride=cfg.stride, patch=self.bundle.patch_size,
                                 batch_size=cfg.batch_size)

    @torch.inference_mode()
    def probabilities(self, base: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        probs = torch.softmax(logits / cfg.temperature, dim=0)
        if cfg.pamr:
            probs = pamr(base, probs, cfg.pamr_dilations, cfg.pamr_iterations, cfg.pamr_sigma)
        return probs

    @torch.inference_mode()
    def predict_images(self, images: Sequence) -> list[np.ndarray]:
        """Class-id maps (int32, each at its image's own size) for PIL images, all windows batched together."""
        raws = [self._to_tensor(im) for im in images]
        bases = [resize(r, short_side_size(*r.shape[-2:], self.config.short_side), antialias=True) for r in raws]
        preds = []
        for raw, base, logits in zip(raws, bases, self.logits(bases)):
            probs = resize(self.probabilities(base, logits), tuple(raw.shape[-2:]))
            pred = decide(probs, self.has_background, self.config.bg_threshold)
            preds.append(pred.to(torch.int32).cpu().numpy())
        return preds

    def predict(self, samples: Iterable[T], image_of: Callable[[T], object] = lambda s: s.image
                ) -> Iterator[tuple[T, np.ndarray]]:
        """(sample, prediction) for a stream of samples, `images_per_step` images at a time."""
        for chunk in chunks(samples, self.config.images_per_step):
            yield from zip(chunk, self.predict_images([image_of(s) for s in chunk]))
