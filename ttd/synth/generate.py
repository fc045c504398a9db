"""TagMask-Synth: write a deterministic image-text corpus with exact ground-truth tags and masks.

`synthesize(OUT, train=N, val=V, eval=M, pretrain=P)` writes OUT/train/, OUT/val/ and OUT/eval/ (each labelled
split with its gt/) and OUT/pretrain/ in img2dataset's layout, then OUT/synth.json last. Every sample draws from its
own generator `default_rng([seed, split_code, index])`, so a sample depends on nothing but (seed, split, index):
not on other samples, shard size or output format. docs/SYNTH.md describes the world, every file and every column.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
from PIL import Image
from pydantic import Field

from ttd.corpus.img2dataset_writer import OUTPUT_FORMATS, ShardWriter, make_key
from ttd.errors import TTDError
from ttd.store.uri import Location, resolve
from ttd.synth.captions import (
    ALT_TEXT,
    CC3M,
    CC3M_ALT_TEXT,
    MULTI_OBJECT,
    PRESETS,
    CaptionMaker,
    CaptionStyle,
    Mention,
    ThingFact,
)
from ttd.synth.render import Rendered, Renderer, Scene, sample_scene
from ttd.synth.vocabulary import MAX_STUFF_CLASSES, MAX_THING_CLASSES, Vocabulary, build_vocabulary

__all__ = ["ALT_TEXT", "MULTI_OBJECT", "CaptionStyle", "SynthConfig", "synthesize", "make_sample", "Sample",
           "GENERATOR_VERSION", "SPLIT_CODES"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"  # bump whenever the same (config, seed) would produce different bytes
SPLIT_CODES = {"train": 1, "eval": 2, "pretrain": 3, "val": 4}  # part of every sample's seed: no shared images
LABELLED = ("val", "eval")  # splits written with ground truth: val to choose settings on, eval to report
_OWN_NAMES = {"train", "val", "eval", "pretrain", "synth.json"}
_PROGRESS_EVERY = 64


class SynthConfig(pydantic.BaseModel):
    """Everything that shapes the generated data except the sample seed and the split sizes."""

    model_config = pydantic.ConfigDict(extra="forbid")

    image_size: int = Field(96, ge=32, le=512, description="Side of the square RGB images, in pixels.")
    n_thing_classes: int = Field(200, ge=2, le=MAX_THING_CLASSES, description="Thing (object) classes.")
    n_stuff_classes: int = Field(16, ge=1, le=MAX_STUFF_CLASSES, description="Stuff (background) classes.")
    vocab_seed: int = Field(0, ge=0, description="Picks the nouns and their appearance; independent of the seed.")
    shard_size: int = Field(1000, ge=1, le=10000, description="Samples per shard (keys stay 9 digits).")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality (4:4:4 chroma, so thin stripes survive).")
    n_things_min: int = Field(1, ge=1, description="Fewest thing instances per image.")
    n_things_max: int = Field(6, ge=1, le=20, description="Most thing instances per image.")
    p_dominant: float = Field(0.7, ge=0, le=1, description="An image has one large, central, dominant thing.")
    dominant_size: tuple[float, float] = Field((0.45, 0.7), description="Dominant body diameter / image side.")
    other_size: tuple[float, float] = Field((0.16, 0.36), description="Other bodies' diameter / image side.")
    p_repeat: float = Field(0.15, ge=0, le=1, description="A further instance reuses a class already in the image.")
    aspect_jitter: float = Field(0.15, ge=0, le=0.7, description="Log aspect-ratio jitter per instance.")
    rotation_max_deg: float = Field(25.0, ge=0, le=180, description="Uniform rotation in +-this many degrees.")
    colour_jitter: float = Field(0.12, ge=0, le=0.5, description="Per-instance brightness jitter (fraction).")
    n_stuff_min: int = Field(1, ge=1, description="Fewest stuff regions per image.")
    n_stuff_max: int = Field(3, ge=1, description="Most stuff regions per image (clamped to n_stuff_classes).")
    noise_std: float = Field(4.0, ge=0, description="Per-pixel Gaussian noise (grey levels).")
    min_visible_pixels: int = Field(64, ge=1, description="A class is visible if it keeps this many pixels.")
    train_style: CaptionStyle = Field(CC3M, description="Captions of OUT/train (the corpus to label).")
    eval_style: CaptionStyle = Field(CC3M, description="Captions of OUT/eval and OUT/val.")
    pretrain_style: CaptionStyle = Field(CC3M_ALT_TEXT, description="Captions of OUT/pretrain (web alt-text).")

    @pydantic.field_validator("train_style", "eval_style", "pretrain_style", mode="before")
    @classmethod
    def _style_from_preset(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        """A preset name, or a partial mapping laid over the split's own preset (not over the class defaults)."""
        base = "cc3m_alt_text" if info.field_name == "pretrain_style" else "cc3m"
        if isinstance(value, dict):  # {"preset": name, **fields} or just fields
            value = dict(value)
            name = value.pop("preset", base)
        elif isinstance(value, str):
            name, value = value, {}
        else:
            return value
        if name not in PRESETS:
            raise ValueError(f"unknown caption style preset {name!r}: use one of {', '.join(PRESETS)}")
        return {**PRESETS[name].model_dump(), **value}

    @pydantic.field_validator("dominant_size", "other_size")
    @classmethod
    def _size_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= hi <= 1.5:
            raise ValueError(f"size range must satisfy 0 < low <= high <= 1.5, got {value}")
        return value

    @pydantic.model_validator(mode="after")
    def _ranges(self) -> SynthConfig:
        if self.n_things_min > self.n_things_max:
            raise ValueError(f"n_things_min ({self.n_things_min}) > n_things_max ({self.n_things_max})")
        if self.n_stuff_min > self.n_stuff_max:
            raise ValueError(f"n_stuff_min ({self.n_stuff_min}) > n_stuff_max ({self.n_stuff_max})")
        if (self.n_things_max + self.n_stuff_max) * self.min_visible_pixels > self.image_size ** 2:
            # Pigeonhole: then some layer of every image keeps min_visible_pixels, so a caption always has a subject.
            raise ValueError(f"min_visible_pixels ({self.min_visible_pixels}) is too large for {self.image_size} px "
                             f"images with up to {self.n_things_max + self.n_stuff_max} layers")
        if self.n_things_max >= self.n_thing_classes:
            raise ValueError(f"n_thing_classes ({self.n_thing_classes}) must exceed n_things_max "
                             f"({self.n_things_max}) so absent objects can be named")
        return self

    def style(self, split: str) -> CaptionStyle:
        return {"train": self.train_style, "val": self.eval_style, "eval": self.eval_style,
                "pretrain": self.pretrain_style}[split]


# ---------------------------------------------------------------- one sample

@dataclass
class Sample:
    split: str
    index: int
    caption: str
    scene: Scene
    rendered: Rendered
    mentions: list[Mention]
    pixels: np.ndarray  # per class id: pixel count in the class map
    visible_instance_pixels: list[int]  # per thing instance, after occlusion


class SampleMaker:
    """Makes samples for one (config, vocabulary); holds the renderer and caption maker so they are built once."""

    def __init__(self, cfg: SynthConfig, vocab: Vocabulary | None = None):
        self.cfg = cfg
        self.vocab = vocab or build_vocabulary(cfg.n_thing_classes, cfg.n_stuff_classes, cfg.vocab_seed)
        self.renderer = Renderer(self.vocab, cfg.image_size, cfg.noise_std)
        self.captions = CaptionMaker(self.vocab)

    def make(self, seed: int, split: str, index: int) -> Sample:
        cfg = self.cfg
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        scene = sample_scene(rng, self.vocab, cfg)
        r = self.renderer.render(scene, rng)
        pixels = np.bincount(r.class_map.ravel(), minlength=self.vocab.n_classes)
        n_regions = len(scene.stuff.class_ids)
        layers = np.bincount(r.layer_map.ravel(), minlength=n_regions + len(scene.things))
        inst_pixels = [int(x) for x in layers[n_regions:]]
        facts = self._thing_facts(scene, pixels, inst_pixels)
        stuff = {cid: int(pixels[cid]) for cid in scene.stuff.class_ids if pixels[cid] >= cfg.min_visible_pixels}
        present = {int(c) for c in np.flatnonzero(pixels)}
        caption, mentions = self.captions.make(rng, facts, stuff, present, cfg.style(split))
        return Sample(split, index, caption, scene, r, mentions, pixels, inst_pixels)

    def _thing_facts(self, scene: Scene, pixels: np.ndarray, inst_pixels: list[int]) -> list[ThingFact]:
        """Visible thing classes, largest first; instance counts only count instances that are visible alone."""
        need = self.cfg.min_visible_pixels
        by_class: dict[int, list[int]] = {}
        dominant_class = None
        for t, px in zip(scene.things, inst_pixels):
            by_class.setdefault(t.class_id, []).append(px)
            if t.dominant and px >= need:
                dominant_class = t.class_id
        facts = [ThingFact(cid, int(pixels[cid]), max(1, sum(p >= need for p in pxs)), cid == dominant_class)
                 for cid, pxs in by_class.items() if pixels[cid] >= need]
        return sorted(facts, key=lambda f: (-f.pixels, f.class_id))


def make_sample(seed: int, split: str, index: int, config: SynthConfig | None = None) -> Sample:
    """One sample without writing anything (tests, notebooks). Builds the vocabulary each call: use SampleMaker
    for many samples."""
    return SampleMaker(config or SynthConfig()).make(seed, split, index)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_mask(class_map: np.ndarray, sixteen_bit: bool) -> bytes:
    """A greyscale PNG (8- or 16-bit) written directly: several times faster than Pillow's encoder on small masks,
    and its bytes do not depend on the Pillow version."""
    h, w = class_map.shape
    depth = 16 if sixteen_bit else 8
    rows = np.zeros((h, 1 + w * depth // 8), dtype=np.uint8)  # each row starts with filter type 0 (none)
    rows[:, 1:] = class_map.astype(">u2" if sixteen_bit else np.uint8).view(np.uint8).reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------- writers

MENTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("mention_index", pa.int32()), ("text", pa.string()), ("lemma", pa.string()),
    ("char_start", pa.int32()), ("char_end", pa.int32()), ("class_id", pa.int32()), ("class_name", pa.string()),
    ("kind", pa.string()), ("visible", pa.bool_()), ("n_words", pa.int32()), ("pixels", pa.int64()),
    ("n_instances", pa.int32()), ("is_dominant", pa.bool_()),
])
INSTANCE_SCHEMA = pa.schema([
    ("key", pa.string()), ("kind", pa.string()), ("instance_index", pa.int32()), ("class_id", pa.int32()),
    ("class_name", pa.string()), ("is_dominant", pa.bool_()), ("area", pa.int64()), ("full_area", pa.int64()),
    ("occluded_fraction", pa.float64()), ("visible", pa.bool_()), ("bbox", pa.list_(pa.int32(), 4)),
    ("center_x", pa.float64()), ("center_y", pa.float64()), ("size", pa.float64()), ("rotation_deg", pa.float64()),
])


class GroundTruthWriter:
    """OUT/eval/gt/: one mask PNG per sample as it comes, then mentions, instances and classes at the end."""

    def __init__(self, loc: Location, vocab: Vocabulary, min_visible_pixels: int):
        self.loc = loc
        self.vocab = vocab
        self.min_visible = min_visible_pixels
        self.sixteen_bit = vocab.n_classes > 256
        self._row_col: tuple[np.ndarray, np.ndarray] | None = None
        self.mentions: dict[str, list] = {f.name: [] for f in MENTION_SCHEMA}
        self.instances: dict[str, list] = {f.name: [] for f in INSTANCE_SCHEMA}
        loc.fs.makedirs(loc.join("masks"), exist_ok=True)

    def add(self, key: str, s: Sample) -> None:
        with self.loc.fs.open(self.loc.join("masks", f"{key}.png"), "wb") as f:
            f.write(encode_mask(s.rendered.class_map, self.sixteen_bit))
        for i, m in enumerate(s.mentions):
            info = self.vocab[m.class_id]
            row = {"key": key, "mention_index": i, "text": m.text, "lemma": m.lemma, "char_start": m.start,
                   "char_end": m.end, "class_id": m.class_id, "class_name": info.name, "kind": info.kind,
                   "visible": m.visible, "n_words": len(m.text.split()), "pixels": m.pixels,
                   "n_instances": m.n_instances, "is_dominant": m.dominant}
            for k, v in row.items():
                self.mentions[k].append(v)
        self._add_instances(key, s)

    def _add_instances(self, key: str, s: Sample) -> None:
        layer = s.rendered.layer_map
        size = layer.shape[0]
        n_regions = len(s.scene.stuff.class_ids)
        n_layers = n_regions + len(s.scene.things)
        flat = layer.ravel().astype(np.intp)
        areas = np.bincount(flat, minlength=n_layers)
        # Rows and columns each layer touches, for all layers in two bincounts (not one mask per layer).
        if self._row_col is None or self._row_col[0].size != flat.size:
            self._row_col = np.divmod(np.arange(flat.size), size)
        ys, xs = self._row_col
        rows = np.bincount(flat * size + ys, minlength=n_layers * size).reshape(n_layers, size) > 0
        cols = np.bincount(flat * size + xs, minlength=n_layers * size).reshape(n_layers, size) > 0
        regions = [(r, "stuff", r, cid, None) for r, cid in enumerate(s.scene.stuff.class_ids)]
        things = [(n_regions + i, "thing", i, t.class_id, t) for i, t in enumerate(s.scene.things)]
        for code, kind, index, cid, t in regions + things:
            area = int(areas[code])
            full = s.rendered.full_area[index] if t is not None else area
            if area:
                ys, xs = np.flatnonzero(rows[code]), np.flatnonzero(cols[code])
                bbox = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
            else:
                bbox = None
            row = {"key": key, "kind": kind, "instance_index": index, "class_id": cid,
                   "class_name": self.vocab[cid].name, "is_dominant": bool(t is not None and t.dominant),
                   "area": area, "full_area": full,
                   "occluded_fraction": round(1.0 - area / full, 6) if full else 1.0,
                   "visible": area >= self.min_visible, "bbox": bbox,
                   "center_x": round(t.cx, 4) if t else None, "center_y": round(t.cy, 4) if t else None,
                   "size": round(2 * t.half, 4) if t else None,
                   "rotation_deg": round(math.degrees(t.angle), 4) if t else None}
            for k, v in row.items():
                self.instances[k].append(v)

    def close(self) -> None:
        for name, cols, schema in (("mentions", self.mentions, MENTION_SCHEMA),
                                   ("instances", self.instances, INSTANCE_SCHEMA)):
            table = pa.Table.from_pydict(cols, schema=schema)
            with self.loc.fs.open(self.loc.join(f"{name}.parquet"), "wb") as f:
                pq.write_table(table, f, compression="zstd")
        with self.loc.fs.open(self.loc.join("classes.json"), "wb") as f:
            f.write(self.vocab.json_bytes())


class SplitStats:
    """Caption statistics of one split, for the summary and synth.json (they show a split's style at a glance)."""

    def __init__(self) -> None:
        self.samples = 0
        self.mentions = self.visible = self.absent = self.stuff = 0
        self.visible_thing_mentions = 0
        self.one_visible_thing = 0
        self.with_absent = 0
        self.visible_thing_classes = 0
        self.words = 0
        self.multi_images = 0  # images with >= 2 visible thing classes ...
        self.multi_mentions = 0  # ... and their visible thing mentions

    def add(self, s: Sample, min_visible: int, vocab: Vocabulary) -> None:
        self.samples += 1
        vis_things = sum(1 for m in s.mentions if m.visible and vocab[m.class_id].kind == "thing")
        classes = {t.class_id for t in s.scene.things if s.pixels[t.class_id] >= min_visible}
        self.mentions += len(s.mentions)
        self.visible += sum(m.visible for m in s.mentions)
        self.absent += sum(not m.visible for m in s.mentions)
        self.stuff += sum(vocab[m.class_id].kind == "stuff" for m in s.mentions)
        self.visible_thing_mentions += vis_things
        self.one_visible_thing += vis_things == 1
        self.with_absent += any(not m.visible for m in s.mentions)
        self.visible_thing_classes += len(classes)
        self.words += len(s.caption.split())
        if len(classes) >= 2:
            self.multi_images += 1
            self.multi_mentions += vis_things

    def to_dict(self, shards: int) -> dict[str, Any]:
        n = max(self.samples, 1)
        return {"samples": self.samples, "shards": shards, "mentions": self.mentions,
                "visible_mentions": self.visible, "absent_mentions": self.absent, "stuff_mentions": self.stuff,
                "mean_visible_thing_mentions": round(self.visible_thing_mentions / n, 4),
                "mean_visible_thing_mentions_multi": round(self.multi_mentions / max(self.multi_images, 1), 4),
                "mean_visible_thing_classes": round(self.visible_thing_classes / n, 4),
                "frac_one_visible_thing": round(self.one_visible_thing / n, 4),
                "frac_with_absent": round(self.with_absent / n, 4),
                "mean_caption_words": round(self.words / n, 4)}


# ---------------------------------------------------------------- the entry point

def synthesize(out_uri: str, *, train: int, eval: int, pretrain: int = 0, seed: int = 0, val: int = 0,
               config: SynthConfig | None = None, output_format: str = "webdataset",
               progress: Callable[[str, int], None] | None = None) -> dict:
    """Writes OUT/train/ and OUT/eval/ (and OUT/val/, OUT/pretrain/ when asked for); returns a summary dict
    (counts per split, shards, classes, mentions, seconds). Same arguments, byte-identical files. `val` is a
    labelled split like eval, from other images: settings are chosen on it, figures reported on eval."""
    cfg = config or SynthConfig()
    sizes = {"train": train, "val": val, "eval": eval, "pretrain": pretrain}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise TTDError(f"{name} must be a whole number >= 0, got {n!r}")
        if n > cfg.shard_size * 100000:
            raise TTDError(f"{name}={n} needs more than 100000 shards: raise shard_size")
    if not isinstance(seed, int) or seed < 0:
        raise TTDError(f"seed must be a whole number >= 0, got {seed!r}")
    if output_format not in OUTPUT_FORMATS:
        raise TTDError(f"unknown output format {output_format!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    root = resolve(out_uri, what="output")
    _prepare(root)
    maker = SampleMaker(cfg)
    t0 = time.perf_counter()
    splits: dict[str, Any] = {}
    for name, n in sizes.items():
        if n:
            splits[name] = _write_split(root.child(name), name, n, seed, maker, output_format, progress)
    seconds = time.perf_counter() - t0
    record = {"generator": "ttd.synth", "generator_version": GENERATOR_VERSION, "seed": seed,
              "output_format": output_format, "config": cfg.model_dump(mode="json"),
              "classes": {"thing": int(len(maker.vocab.thing_ids)), "stuff": int(len(maker.vocab.stuff_ids)),
                          "sha256": maker.vocab.digest()},
              "splits": splits}
    with root.fs.open(root.join("synth.json"), "wb") as f:  # last: its presence marks a finished output
        f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    total = sum(sizes.values())
    log.info("TagMask-Synth: %d samples in %.1f s (%.0f images/s) to %s", total, seconds,
             total / max(seconds, 1e-9), root.uri())
    return {"out": root.uri(), "seed": seed, "train": train, "val": val, "eval": eval, "pretrain": pretrain,
            "shards": sum(s["shards"] for s in splits.values()),
            "classes": int(len(maker.vocab.thing_ids) + len(maker.vocab.stuff_ids)),
            "thing_classes": int(len(maker.vocab.thing_ids)), "stuff_classes": int(len(maker.vocab.stuff_ids)),
            "mentions": sum(s["mentions"] for s in splits.values()),
            "seconds": round(seconds, 3), "images_per_second": round(total / max(seconds, 1e-9), 1),
            "splits": splits}


def _prepare(root: Location) -> None:
    """Refuse a folder holding anything but a previous TagMask-Synth output; clear such an output (a shorter rerun
    must not leave stale shards behind)."""
    fs = root.fs
    if not fs.exists(root.path):
        fs.makedirs(root.path, exist_ok=True)
        return
    if not fs.isdir(root.path):
        raise TTDError(f"output {root.uri()!r} is a file: give a folder")
    names = sorted({posixpath.basename(p.rstrip("/")) for p in fs.ls(root.path, detail=False)})
    foreign = [n for n in names if n not in _OWN_NAMES]
    if foreign:
        raise TTDError(f"output {root.uri()!r} already holds other files ({', '.join(foreign[:3])}): "
                       "choose a new or empty folder")
    if names:
        log.warning("replacing the previous TagMask-Synth output in %s", root.uri())
    for n in names:
        fs.rm(root.join(n), recursive=True)


def _write_split(loc: Location, split: str, n: int, seed: int, maker: SampleMaker, output_format: str,
                 progress: Callable[[str, int], None] | None) -> dict[str, Any]:
    cfg = maker.cfg
    gt = GroundTruthWriter(loc.child("gt"), maker.vocab, cfg.min_visible_pixels) if split in LABELLED else None
    stats = SplitStats()
    shards = math.ceil(n / cfg.shard_size)
    pending = 0
    for shard in range(shards):
        writer = ShardWriter(loc, shard, output_format=output_format)
        for index in range(shard * cfg.shard_size, min(n, (shard + 1) * cfg.shard_size)):
            key = make_key(shard, index - shard * cfg.shard_size)
            s = maker.make(seed, split, index)
            writer.add(key, s.caption, encode_jpeg(s.rendered.image, cfg.jpeg_quality),
                       width=cfg.image_size, height=cfg.image_size)
            if gt is not None:
                gt.add(key, s)
            stats.add(s, cfg.min_visible_pixels, maker.vocab)
            pending += 1
            if progress is not None and pending >= _PROGRESS_EVERY:
                progress(split, pending)
                pending = 0
        writer.close()
        if progress is not None and pending:
            progress(split, pending)
            pending = 0
    if gt is not None:
        gt.close()
    log.info("%s: %d samples in %d shards", split, n, shards)
    return stats.to_dict(shards)
