"""`ttd show`: one sample's image, caption, every candidate tag with its scores, and the stored heatmaps, as a PNG
drawn with matplotlib (proportional text that does not run words together, a real table, one colour scale).

The heatmaps of a sample share one scale and a colour bar: a stop word's weak map looks weak beside a strong one
instead of being stretched to the same contrast. Every selected tag's map is drawn up to `max_tiles`; past that a
tile says how many more there are.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pyarrow.dataset as ds
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ttd.corpus import Sample, open_corpus
from ttd.errors import TTDError
from ttd.store.heatmap import dequantise
from ttd.store.store import Store

TILE_IN = 2.0  # inches per image tile
DPI = 100
CMAP = "viridis"


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
    maps = [(r, dequantise(m["heatmap"], m["height"], m["width"], m["vmin"], m["vmax"]))
            for r in rel if (m := masks.get(r["tag_index"]))]
    draw_figure(sample, rel, maps, max_tiles).savefig(out, dpi=DPI)
    return out


def draw_figure(sample: Sample, rel: list[dict], maps: list[tuple[dict, np.ndarray]], max_tiles: int) -> Figure:
    image = np.asarray(sample.image().convert("RGB"))
    shown, hidden = maps[:max_tiles], len(maps) - max_tiles
    cols = 1 + len(shown) + (hidden > 0)
    caption = textwrap.fill(sample.caption or "(no caption)", width=int(22 * max(cols, 3)))
    table_h = 0.24 * (len(rel) + 1)
    text_h = 0.22 * (caption.count("\n") + 1) + 0.3
    fig = Figure(figsize=(max(TILE_IN * cols + 0.8, 7.0), TILE_IN + 0.5 + text_h + table_h), dpi=DPI)
    FigureCanvasAgg(fig)
    top = 1 - (TILE_IN + 0.5) / fig.get_figheight()
    grid = fig.add_gridspec(1, cols, left=0.02, right=0.9 if shown else 0.98, top=0.94, bottom=top + 0.02,
                            wspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image)
    ax.set_title(sample.key, fontsize=9)
    ax.axis("off")
    if shown:
        lo = min(float(h.min()) for _, h in shown)
        hi = max(float(h.max()) for _, h in shown)
        for i, (r, heat) in enumerate(shown, start=1):
            ax = fig.add_subplot(grid[0, i])
            ax.imshow(image)
            layer = ax.imshow(heat, cmap=CMAP, vmin=lo, vmax=max(hi, lo + 1e-6), alpha=0.6, interpolation="bilinear",
                              extent=(0, image.shape[1], image.shape[0], 0))
            ax.set_title(f"{r['text']}  {r['pixel_score']:.2f}", fontsize=9)
            ax.axis("off")
        bar = fig.add_axes((0.92, top + 0.04, 0.015, 0.94 - top - 0.06))
        fig.colorbar(layer, cax=bar).ax.tick_params(labelsize=7)
        bar.set_title("heat", fontsize=7)
    if hidden > 0:
        ax = fig.add_subplot(grid[0, cols - 1])
        ax.text(0.5, 0.5, f"+{hidden} more\nselected", ha="center", va="center", fontsize=11)
        ax.axis("off")
    fig.text(0.02, top - 0.01, caption, va="top", fontsize=10)
    rows = [[r["text"], f"{r['pixel_score']:.2f}", f"{r['image_score']:.2f}", f"{r['text_score']:.2f}",
             "yes" if r["selected"] else ""] for r in rel]
    if rows:
        height = table_h / fig.get_figheight()
        ax = fig.add_axes((0.02, 0.01, 0.6, height))
        ax.axis("off")
        table = ax.table(cellText=rows, colLabels=["tag", "pixel", "image", "text", "selected"], loc="upper left",
                         cellLoc="right", colLoc="right", colWidths=[0.4, 0.15, 0.15, 0.15, 0.15], bbox=(0, 0, 1, 1))
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for (row, col), cell in table.get_celld().items():
            cell.set_edgecolor("#dddddd")
            if col == 0:
                cell.set_text_props(ha="left")
            if row > 0 and rel[row - 1]["selected"]:
                cell.set_facecolor("#eef6ee")
    return fig
