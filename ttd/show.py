"""`ttd show`: one sample's image, caption, candidate tags with their scores, and the stored heatmaps, as a PNG."""

from __future__ import annotations

import textwrap

import numpy as np
import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from .corpus import Sample, open_corpus
from .errors import TTDError
from .heatmap import dequantise
from .store import Store

TILE = 192


def colormap(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, dark blue to yellow (a perceptually ordered ramp)."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[48, 18, 59], [40, 120, 220], [30, 200, 140], [200, 220, 40], [250, 250, 90]], np.float32)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - lo
    return (stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    h = Image.fromarray(heat.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR)
    arr = np.asarray(h)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)
    colour = Image.fromarray(colormap(arr))
    return Image.blend(image.convert("RGB"), colour, alpha)


def find_sample(store: Store, key: str) -> tuple[Sample, str, str]:
    rel = store.read("relevancy", columns=["corpus", "shard"], filter=ds.field("key") == key)
    if rel.num_rows == 0:
        raise TTDError(f"key {key!r} has no scores in the store: run `ttd score` on its corpus first")
    corpus_name, shard_name = rel["corpus"][0].as_py(), rel["shard"][0].as_py()
    doc = store.corpora().get(corpus_name)
    if doc is None:
        raise TTDError(f"corpus {corpus_name!r} is not registered in the store")
    corpus = open_corpus(doc["uri"], fmt=doc["format"], name=corpus_name)
    shard = next((s for s in corpus.shards() if s.name == shard_name), None)
    for item in corpus.read_shard(shard) if shard else []:
        if isinstance(item, Sample) and item.key == key:
            return item, corpus_name, shard_name
    raise TTDError(f"sample {key!r} is no longer in corpus {doc['uri']!r}")


def render(store_uri: str, key: str, out: str, max_tiles: int = 8) -> str:
    store = Store(store_uri)
    sample, corpus_name, shard_name = find_sample(store, key)
    where = (ds.field("key") == key) & (ds.field("corpus") == corpus_name) & (ds.field("shard") == shard_name)
    rel = sorted(store.read("relevancy", filter=where).to_pylist(), key=lambda r: r["tag_index"])
    masks = {m["tag_index"]: m for m in store.read("masks", filter=where).to_pylist()}
    image = sample.image().resize((TILE, TILE), Image.BICUBIC)
    tiles = [(f"{r['text']} {r['pixel_score']:.2f}", overlay(image, dequantise(
        masks[r["tag_index"]]["heatmap"], masks[r["tag_index"]]["height"], masks[r["tag_index"]]["width"],
        masks[r["tag_index"]]["vmin"], masks[r["tag_index"]]["vmax"]))) for r in rel if r["tag_index"] in masks]
    tiles = tiles[:max_tiles]
    font = ImageFont.load_default()
    lines = textwrap.wrap(sample.caption or "(no caption)", 90)
    table = [f"{'tag':20s} {'pixel':>6s} {'image':>6s} {'text':>6s}  sel"] + [
        f"{r['text'][:20]:20s} {r['pixel_score']:6.2f} {r['image_score']:6.2f} {r['text_score']:6.2f}  "
        f"{'yes' if r['selected'] else ''}" for r in rel]
    cols = 1 + len(tiles)
    width = max(TILE * cols + 10 * (cols + 1), 640)
    text_h = 14 * (len(lines) + len(table) + 3)
    canvas = Image.new("RGB", (width, TILE + 40 + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(image, (10, 24))
    draw.text((10, 6), f"{key}  (image)", fill="black", font=font)
    for i, (label, tile) in enumerate(tiles):
        x = 10 + (i + 1) * (TILE + 10)
        canvas.paste(tile, (x, 24))
        draw.text((x, 6), label, fill="black", font=font)
    y = TILE + 34
    for line in lines:
        draw.text((10, y), line, fill="black", font=font)
        y += 14
    y += 14
    for line in table:
        draw.text((10, y), line, fill="black", font=font)
        y += 14
    canvas.save(out)
    return out
