"""Benchmark: the `score` stage against a naive scorer on the same TagMask-Synth shard, in one process run.

Naive: one image at a time, every caption's tags encoded afresh through the prompt ensemble (no cache) with
open_clip's plain `encode_text`, the same dense head and the same scores. Stage: `run_score` in this process
(workers=0: no Ray start-up in the timing),
batched images, threaded decoding, tag embeddings cached in the store, text tokens trimmed after the
longest prompt of a batch (exact under the causal mask). Both produce the same selections (checked).

    .venv/bin/python benchmarks/score.py              # tiny model (200 images) and random ViT-B-16 (24 images)
    .venv/bin/python benchmarks/score.py --quick      # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ttd.corpus import Sample, open_corpus
from ttd.models import load_model
from ttd.models.dense import encode_image_dense
from ttd.relevancy import ScoreConfig, encode_tags, encode_texts, normalise, raw_scores
from ttd.score import run_score
from ttd.store import Store
from ttd.synth.generate import synthesize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def parse_tags(corpus: str, store: str) -> None:
    """The real parse stage when it exists; the tests' whitespace splitter otherwise."""
    try:
        from ttd.parse import ParseConfig, run_parse
    except ImportError:
        from conftest import write_simple_tags

        write_simple_tags(store, corpus)
        return
    run_parse(corpus, store, ParseConfig())


@torch.no_grad()
def naive(corpus_uri: str, store_uri: str, model: str, config: ScoreConfig) -> tuple[float, int, dict]:
    bundle = load_model(model, device="cpu")
    tags = Store(store_uri).read("tags", columns=["key", "tag_index", "lower"]).to_pylist()
    by_key: dict[str, list[dict]] = {}
    for r in tags:
        by_key.setdefault(r["key"], []).append(r)
    corpus = open_corpus(corpus_uri)
    selected = {}
    n = 0
    t0 = time.perf_counter()
    for shard in corpus.shards():
        for s in corpus.read_shard(shard):
            if not isinstance(s, Sample) or s.key not in by_key:
                continue
            image = bundle.preprocess(s.image()).unsqueeze(0)
            g, dense = encode_image_dense(bundle.model, image, config.head)
            cands = sorted(by_key[s.key], key=lambda r: r["tag_index"])
            tag_emb = encode_tags(bundle, [c["lower"] for c in cands], config.templates, trim=False)  # no cache
            cap = encode_texts(bundle, [s.caption or ""], trim=False)[0]
            pixel, _, _, _ = raw_scores(g[0], dense[0], cap, tag_emb)
            sel = normalise(pixel.numpy(), config.normalisation) >= config.threshold
            for c, v in zip(cands, sel):
                selected[(s.key, c["tag_index"])] = bool(v)
            n += 1
    return time.perf_counter() - t0, n, selected


def stage(corpus_uri: str, tags_store: str, tmp: Path, model: str, config: ScoreConfig) -> tuple[float, int, dict]:
    store = tmp / f"stage-{model}"
    shutil.copytree(tags_store, store)
    t0 = time.perf_counter()
    summary = run_score(corpus_uri, str(store), config, model=model, workers=0)
    seconds = time.perf_counter() - t0
    rel = Store(str(store)).read("relevancy", columns=["key", "tag_index", "selected"]).to_pylist()
    return seconds, summary["images"], {(r["key"], r["tag_index"]): r["selected"] for r in rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny-images", type=int, default=200)
    ap.add_argument("--vitb-images", type=int, default=24)
    ap.add_argument("--skip-vitb", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tiny_images, args.vitb_images = 48, 8
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    runs = [("ttd-tiny", args.tiny_images, ScoreConfig(batch_size=64))]
    if not args.skip_vitb:
        runs.append(("ViT-B-16", args.vitb_images, ScoreConfig(batch_size=8)))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for model, n_images, config in runs:
            out = tmp / f"synth-{model}"
            synthesize(str(out), train=n_images, eval=0, seed=0)
            corpus = str(out / "train")
            tags_store = tmp / f"tags-{model}"
            Store(str(tags_store), create=True)
            parse_tags(corpus, str(tags_store))
            t_naive, n1, sel_naive = naive(corpus, str(tags_store), model, config)
            t_stage, n2, sel_stage = stage(corpus, str(tags_store), tmp, model, config)
            assert n1 == n2, (n1, n2)
            agree = np.mean([sel_naive[k] == sel_stage.get(k) for k in sel_naive])
            r_naive, r_stage = n1 / t_naive, n2 / t_stage
            print(f"{model:9s} images={n1:4d}  naive {r_naive:8.2f} img/s  stage {r_stage:8.2f} img/s  "
                  f"ratio {r_stage / r_naive:5.2f}x  selection agreement {agree:.4f}")


if __name__ == "__main__":
    main()
