"""`ttd evaluate --dataset tagmask`: tag selection and caption-level segmentation on a TagMask-style eval set.

Input: an eval split written by `ttd synth` (or a user's CC3M-TagMask in the same layout): img2dataset shards with
captions, plus `gt/mentions.parquet` (each noun mention's span, class and visibility) and `gt/masks/KEY.png` (the
class-index map). Per caption:

- the caption's candidate words (parse policy `words`) are scored by pixel-, image- and text-tag relevancy
  (`ttd.models.relevancy`, the same code as the `score` stage), and by the noun-parsing baseline (a word is
  selected when the `nouns` policy keeps it); a word's target is whether it lies in a mention of something visible;
- the caption's heatmap (patch cosine with the caption embedding, bilinearly upsampled, min-max normalised per
  image, thresholded at `bg_threshold`) is compared with the union of its visible mentions' masks. The heatmap is
  one pass at the model's input size by default (`caption: single`); `caption: paper` makes it as the TTD paper
  evaluates segmentation (short side 448, sliding 448 windows, scales 1.0/0.5/1.5/2.0, flip, PAMR), with the
  segmentation evaluator's own multi-scale and PAMR code (`ttd.eval.segmentation.infer`).

Rows go to `eval_predictions` and `eval_counts`; every metric is a query in `ttd.eval.metrics_sql`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from ttd.configs import SCORE_PERF_FIELDS, CaptionProtocol, ParseConfig, TagmaskEvalConfig
from ttd.corpus import ReadIssue, open_corpus
from ttd.errors import ImageDecodeError, TTDError
from ttd.eval.metrics_sql import CAPTION_CLASS_ID, SELECTED_UNION_CLASS_ID, tagmask_metrics
from ttd.models import load_model, model_identity
from ttd.models.dense import encode_image_dense
from ttd.models.loading import model_role
from ttd.models.relevancy import dense_features, encode_tags, encode_texts, normalisations, normalise, raw_scores
from ttd.store import schemas
from ttd.store.store import Store, fingerprint
from ttd.store.uri import resolve
from ttd.text.tags import CaptionParser

log = logging.getLogger(__name__)

STAGE = "evaluate"
STAGE_VERSION = 2  # 2: the selected tags' union row (SELECTED_UNION_CLASS_ID)
METHODS = ("pixel", "image", "text")


def load_ground_truth(root: str) -> tuple[dict[str, list[dict]], Any]:
    loc = resolve(root, must_exist=True, what="eval set")
    path = loc.join("gt", "mentions.parquet")
    if not loc.fs.exists(path):
        raise TTDError(f"{root!r} is not a TagMask-style eval set: {path} is missing (write one with `ttd synth`)")
    with loc.fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    mentions: dict[str, list[dict]] = {}
    for r in rows:
        mentions.setdefault(r["key"], []).append(r)
    return mentions, loc


def read_mask(loc, key: str) -> np.ndarray:
    with loc.fs.open(loc.join("gt", "masks", f"{key}.png"), "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())))


def word_targets(starts, ends, mentions: list[dict]) -> list[bool]:
    """A candidate is a true tag when it overlaps the span of a mention of something visible."""
    spans = [(m["char_start"], m["char_end"]) for m in mentions if m["visible"]]
    return [any(s < me and ms < e for ms, me in spans) for s, e in zip(starts, ends)]


def noun_predictions(starts, ends, nouns) -> list[bool]:
    """The noun-parsing baseline selects a word when a `nouns`-policy candidate overlaps it."""
    if isinstance(nouns, Exception) or nouns is None:
        return [False] * len(starts)
    spans = list(zip(nouns.char_start, nouns.char_end))
    return [any(s < ne and ns < e for ns, ne in spans) for s, e in zip(starts, ends)]


def caption_counts(key: str, heat: np.ndarray, class_map: np.ndarray, mentions: list[dict],
                   threshold: float, union: np.ndarray | None = None) -> list[dict]:
    """eval_counts rows: the caption mask against the union of visible mentions, and against each one; with
    `union` (the selected tags' union, L_distill's target) also that map's mask against the visible mentions."""
    pred = heat >= threshold
    visible = sorted({m["class_id"] for m in mentions if m["visible"]})
    names = {m["class_id"]: m["class_name"] for m in mentions}
    truth = np.isin(class_map, visible)
    rows = [_count_row(key, CAPTION_CLASS_ID, "<caption>", pred, truth)]
    rows += [_count_row(key, c, names[c], pred, class_map == c) for c in visible]
    if union is not None:
        rows.append(_count_row(key, SELECTED_UNION_CLASS_ID, "<selected-union>", union >= threshold, truth))
    return rows


def _count_row(key: str, class_id: int, class_name: str, pred: np.ndarray, target: np.ndarray) -> dict:
    return {"dataset": "tagmask", "key": key, "class_id": int(class_id), "class_name": class_name,
            "intersection": int(np.count_nonzero(pred & target)), "union": int(np.count_nonzero(pred | target)),
            "predicted": int(np.count_nonzero(pred)), "target": int(np.count_nonzero(target))}


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(grid_map.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def selected_union(maps: torch.Tensor, selected: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """The L_distill target as `ttd distill` builds it: the pixel-wise max of the selected tags' min-max-normalised
    heatmaps [T, gh, gw], then upsampled to the image; None when no tag is selected."""
    if not selected.any():
        return None
    chosen = maps[torch.from_numpy(np.asarray(selected, dtype=bool)).to(maps.device)].flatten(1)
    lo, hi = chosen.amin(1, keepdim=True), chosen.amax(1, keepdim=True)
    norm = ((chosen - lo) / (hi - lo).clamp_min(1e-8)).reshape(-1, *maps.shape[1:])
    return upsample(norm.amax(0), size).cpu().numpy()


def caption_heatmap(dense: torch.Tensor, caption_emb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[gh, gw, D] patch features -> caption cosine map at image size, min-max normalised to [0, 1]."""
    heat = upsample(torch.einsum("hwd,d->hw", F.normalize(dense.float(), dim=-1), caption_emb.float()), size)
    lo, hi = heat.min(), heat.max()
    return ((heat - lo) / (hi - lo).clamp_min(1e-8)).cpu().numpy()


def protocol_caption_heatmap(bundle, image: Any, caption_emb: torch.Tensor, size: tuple[int, int], head: str,
                             proto: CaptionProtocol) -> np.ndarray:
    """The caption heatmap under a multi-scale protocol: windows at every scale (and flipped) averaged by the
    segmentation evaluator's `multiscale_logits`, min-max normalised, PAMR-refined, at the mask's size."""
    from ttd.eval.segmentation.infer import image_tensor, mean_std, multiscale_logits, pamr, resize, short_side_size

    dev = caption_emb.device
    raw = image_tensor(image, dev)
    base = resize(raw, short_side_size(*raw.shape[-2:], proto.short_side), antialias=True)
    mean, std = mean_std(bundle, dev)
    cap = caption_emb.float()

    def dense_fn(crops: torch.Tensor) -> torch.Tensor:
        return encode_image_dense(bundle.model, crops, head)[1].float()

    def classify(dense: torch.Tensor) -> torch.Tensor:  # one "class": the caption
        return torch.einsum("bhwd,d->bhw", F.normalize(dense, dim=-1), cap)[:, None]

    (cos,) = multiscale_logits([(base - mean) / std], dense_fn, classify, scales=proto.scales, flip=proto.flip,
                               window=proto.window, stride=proto.stride, patch=bundle.patch_size,
                               batch_size=proto.batch_size)
    heat = cos[0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
    if proto.pamr:
        heat = pamr(base, torch.stack([1 - heat, heat]), proto.pamr_dilations, proto.pamr_iterations,
                    proto.pamr_sigma)[1]
    return resize(heat[None], size)[0].cpu().numpy()


@torch.no_grad()
def run_tagmask_eval(root: str, store_uri: str, config: TagmaskEvalConfig | None = None, *,
                     model: str | None = None, pretrained: str | None = None, lora: str | None = None,
                     device: str | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate one model on a TagMask-style eval set; returns {run, model_id, metrics, seconds, skipped}."""
    t0 = time.perf_counter()
    config = config or TagmaskEvalConfig()
    cfg = config.score
    mentions, loc = load_ground_truth(root)
    corpus = open_corpus(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_id = model_identity(model, pretrained, lora=lora)  # a finished run is answered without loading the model
    result_cfg = config.model_dump(mode="json", exclude={"score": set(SCORE_PERF_FIELDS)})
    data_fp = fingerprint([s.fingerprint for s in corpus.shards()])
    run = fingerprint("tagmask", STAGE_VERSION, model_id, data_fp, result_cfg)
    store = Store(store_uri, create=True)
    if store.is_done(STAGE, {"run": run}, run):
        return {"run": run, "model_id": model_id, "skipped": True,
                "metrics": store_metrics(store, run), "seconds": round(time.perf_counter() - t0, 2)}
    bundle = load_model(model, pretrained, device=dev, lora=lora)
    words = CaptionParser.from_config(ParseConfig(policy="words"))
    nouns = CaptionParser.from_config(ParseConfig(policy="nouns"))
    emb_cache: dict[str, torch.Tensor] = {}
    norms = normalisations(cfg, bundle.model)
    preds, counts = [], []
    batch: list = []

    def flush():
        if not batch:
            return
        images = torch.stack([bundle.preprocess(img) for _, img in batch]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            global_emb, dense = dense_features(bundle.model, images, cfg.head, cfg.flip)
        caps = [s.caption or "" for s, _ in batch]
        cap_emb = encode_texts(bundle, caps)
        parsed, nparsed = words.parse(caps), nouns.parse(caps)
        for i, (s, img) in enumerate(batch):
            ms = mentions.get(s.key, [])
            p = parsed[i]
            union_maps = None
            if not isinstance(p, Exception) and p is not None and len(p):
                new = sorted({t for t in p.lower if t not in emb_cache})
                if new:
                    emb_cache.update(zip(new, encode_tags(bundle, new, cfg.templates)))
                tag_emb = torch.stack([emb_cache[t] for t in p.lower]).to(dev)
                *raw, maps = raw_scores(global_emb[i], dense[i], cap_emb[i].to(dev), tag_emb)
                targets = word_targets(p.char_start, p.char_end, ms)
                for method, r in zip(METHODS, raw):
                    norm = normalise(r.cpu().numpy(), *norms[method])
                    if method == "pixel":
                        union_maps = (maps, norm >= cfg.threshold)
                    for j in range(len(p)):
                        preds.append({"dataset": "tagmask", "key": s.key, "method": method, "word_index": j,
                                      "word": p.text[j], "score": float(norm[j]),
                                      "predicted": bool(norm[j] >= cfg.threshold), "target": targets[j]})
                for j, hit in enumerate(noun_predictions(p.char_start, p.char_end, nparsed[i])):
                    preds.append({"dataset": "tagmask", "key": s.key, "method": "noun", "word_index": j,
                                  "word": p.text[j], "score": None, "predicted": hit, "target": targets[j]})
            class_map = read_mask(loc, s.key)
            if config.caption.short_side is None:
                heat = caption_heatmap(dense[i], cap_emb[i].to(dev), class_map.shape[:2])
            else:
                heat = protocol_caption_heatmap(bundle, img, cap_emb[i].to(dev), class_map.shape[:2], cfg.head,
                                                config.caption)
            union = selected_union(*union_maps, class_map.shape[:2]) if union_maps else None
            counts.extend(caption_counts(s.key, heat, class_map, ms, config.bg_threshold, union))
        if progress:
            progress(len(batch))
        batch.clear()

    n = 0
    for shard in corpus.shards():
        for item in corpus.read_shard(shard):
            if isinstance(item, ReadIssue) or item.key not in mentions:
                continue
            try:
                batch.append((item, item.image()))
            except ImageDecodeError as exc:
                log.warning("eval sample %s skipped: %s", item.key, exc)
                continue
            n += 1
            if len(batch) >= cfg.batch_size:
                flush()
            if config.max_samples and n >= config.max_samples:
                break
        if config.max_samples and n >= config.max_samples:
            break
    flush()
    if not preds:
        raise TTDError(f"no eval sample of {root!r} could be evaluated")
    pred_t = schemas.get("eval_predictions").conform(pa.Table.from_pylist(preds))
    count_t = schemas.get("eval_counts").conform(pa.Table.from_pylist(counts))
    metric_rows = [{"dataset": "tagmask", **m, "fingerprint": run, "model_id": bundle.model_id}
                   for m in tagmask_metrics(pred_t, count_t)]
    metrics_t = schemas.get("metrics").conform(pa.Table.from_pylist(metric_rows))
    store.commit(STAGE, {"run": run}, run, {"eval_predictions": pred_t, "eval_counts": count_t,
                                            "metrics": metrics_t},
                 stage_version=STAGE_VERSION, config={**result_cfg, "dataset": "tagmask", "root": root,
                                                      "role": model_role(lora)},
                 model_id=bundle.model_id, input_fingerprint=data_fp)
    return {"run": run, "model_id": bundle.model_id, "skipped": False, "samples": n,
            "metrics": metrics_dict(metric_rows), "seconds": round(time.perf_counter() - t0, 2)}


def metrics_dict(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["method"], {})[r["metric"]] = round(float(r["value"]), 3)
    return out


def store_metrics(store: Store, run: str) -> dict[str, dict[str, float]]:
    import pyarrow.dataset as ds

    return metrics_dict(store.read("metrics", filter=ds.field("run") == run).to_pylist())


def table_text(metrics: dict[str, dict[str, float]]) -> str:
    """The paper-style table (Table 1 rows) and the bias diagnostics, as aligned text."""
    lines = [f"{'tag selection':18s} {'P':>6s} {'R':>6s} {'F1':>6s} {'Acc':>6s} {'mAP':>6s} {'<=1 tag':>8s}"]
    for method, label in (("image", "image-tag"), ("text", "text-tag"), ("pixel", "pixel-tag"),
                          ("noun", "noun parsing")):
        m = metrics.get(method, {})
        cells = [m.get(k) for k in ("precision", "recall", "f1", "accuracy", "map", "single_tag_share")]
        lines.append(f"{label:18s} " + " ".join(f"{v:6.1f}" if v is not None else f"{'-':>6s}" for v in cells[:5])
                     + (f" {cells[5]:8.1f}" if cells[5] is not None else f" {'-':>8s}"))
    c = metrics.get("caption", {})
    lines.append("")
    lines.append("caption heatmap: mIoU {:.1f}  mFPR {:.1f}  mFNR {:.1f}  coverage of best tag {:.1f}, of second "
                 "tag {:.1f}".format(*(c.get(k, float("nan")) for k in ("caption_miou", "caption_mfpr",
                                                                         "caption_mfnr", "coverage_best",
                                                                         "coverage_second"))))
    u = metrics.get("selected_union", {})
    if u:
        lines.append("selected tags' union (L_distill's target, pixel-tag selection): mIoU {:.1f}  mFPR {:.1f}  "
                     "mFNR {:.1f}".format(*(u.get(k, float("nan")) for k in ("caption_miou", "caption_mfpr",
                                                                              "caption_mfnr"))))
    return "\n".join(lines)


__all__ = ["run_tagmask_eval", "table_text"]
