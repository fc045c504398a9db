"""Segmentation evaluation: loaders on generated official layouts, metrics (hand case, numpy reference, SQL), the
sliding-window / multi-scale / flip inference, PAMR, the background threshold, and the whole run on a VOC fixture."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ttd.configs import SegEvalConfig
from ttd.errors import TTDError
from ttd.eval.segmentation import datasets as D
from ttd.eval.segmentation.infer import (
    Segmenter,
    TextClassifier,
    decide,
    multiscale_logits,
    pamr,
    resolve_config,
    window_boxes,
)
from ttd.eval.segmentation.metrics import (
    PER_CLASS_SQL,
    confusion,
    image_counts,
    per_class,
    reference_metrics,
    sql_metrics_of,
    totals,
)
from ttd.models import load_model
from ttd.models.dense import encode_image_dense

H, W = 24, 40  # fixture image size: small, and not square, so rows and columns cannot be swapped unnoticed


# ---- fixtures in the official layouts --------------------------------------------------------------------------------
def _image(path: Path, seed: int, size=(H, W), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _label(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:  # VOC's SegmentationClass PNGs are palette images: the pixel values are the class indices
        im = im.convert("P")
        im.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)])
    im.save(path)


def _raw_labels(seed: int, values: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.choice(values, size=(H // 4, W // 4)).repeat(4, 0).repeat(4, 1)
    return lab.astype(np.uint8)


def make_voc(root: Path, n: int = 3, year: str = "VOC2012", classes_dir: str = "SegmentationClass",
             split: str = "ImageSets/Segmentation/val.txt", values=(0, 1, 7, 15, 20, 255)) -> dict[str, np.ndarray]:
    base = root / "VOCdevkit" / year
    labels = {}
    for i in range(n + 1):
        key = f"2007_{i:06d}"
        _image(base / "JPEGImages" / f"{key}.jpg", i)
        labels[key] = _raw_labels(i, list(values))
        _label(base / classes_dir / f"{key}.png", labels[key], palette=classes_dir == "SegmentationClass")
    (base / split).parent.mkdir(parents=True, exist_ok=True)
    (base / split).write_text("".join(f"{k}\n" for k in list(labels)[:n]))  # the last image is not in val
    return dict(list(labels.items())[:n])


@pytest.fixture
def voc_root(tmp_path):
    return tmp_path / "voc", make_voc(tmp_path / "voc")


def _loaded(name: str, root: Path) -> dict[str, tuple[Image.Image, np.ndarray]]:
    return {s.key: (s.image, s.label) for s in D.open_dataset(name, root)}


# ---- loaders ---------------------------------------------------------------------------------------------------------
def test_voc_loader_reads_val_split_palette_indices_and_ignore(voc_root):
    root, labels = voc_root
    got = _loaded("voc", root)
    assert list(got) == list(labels)  # val.txt order; the image outside val.txt is not read
    for key, (image, label) in got.items():
        assert image.mode == "RGB" and image.size == (W, H)
        np.testing.assert_array_equal(label, labels[key])  # palette indices, not colours; 255 kept as ignore
    data = D.open_dataset("voc", root)
    assert data.num_classes == 21 and data.class_names[0] == "background" and data.has_background
    # the root may also be VOCdevkit/VOC2012 itself
    assert list(_loaded("voc", root / "VOCdevkit" / "VOC2012")) == list(labels)


def test_context_loader(tmp_path):
    labels = make_voc(tmp_path, year="VOC2010", classes_dir="SegmentationClassContext",
                      split="ImageSets/SegmentationContext/val.txt", values=(0, 1, 30, 59))
    got = _loaded("context", tmp_path)
    assert list(got) == list(labels)
    for key, (_, label) in got.items():
        np.testing.assert_array_equal(label, labels[key])
    assert D.open_dataset("context", tmp_path).num_classes == 60


def _coco(root: Path, suffix: str, values: list[int], n: int = 2) -> dict[str, np.ndarray]:
    raw = {}
    for i in range(n):
        key = f"{139 + i:012d}"
        _image(root / "images/val2017" / f"{key}.jpg", i)
        raw[key] = _raw_labels(10 + i, values)
        _label(root / "annotations/val2017" / f"{key}{suffix}", raw[key])
    return raw


def test_coco_stuff_loader(tmp_path):
    raw = _coco(tmp_path, "_labelTrainIds.png", [0, 79, 80, 170, 255])
    got = _loaded("coco-stuff", tmp_path)
    assert list(got) == sorted(raw)
    for key, (_, label) in got.items():
        np.testing.assert_array_equal(label, raw[key])
    assert D.open_dataset("coco-stuff", tmp_path).num_classes == 171


def test_coco_object_loader_instance_maps_and_stuff_fallback(tmp_path):
    inst = _coco(tmp_path / "a", "_instanceTrainIds.png", [0, 1, 80, 255])
    for key, (_, label) in _loaded("coco-object", tmp_path / "a").items():
        np.testing.assert_array_equal(label, inst[key])  # already 0 = background, 1..80 = things
    stuff = _coco(tmp_path / "b", "_labelTrainIds.png", [0, 79, 80, 170, 255])
    for key, (_, label) in _loaded("coco-object", tmp_path / "b").items():
        expect = {0: 1, 79: 80, 80: 0, 170: 0, 255: 255}
        np.testing.assert_array_equal(label, np.vectorize(expect.get)(stuff[key]))
    data = D.open_dataset("coco-object", tmp_path / "a")
    assert data.num_classes == 81 and data.class_names[1] == "person" and data.has_background


def test_cityscapes_loader_maps_label_ids_to_train_ids(tmp_path):
    raw = {}
    for city, i in (("frankfurt", 0), ("lindau", 1)):
        stem = f"{city}_000000_{i:06d}"
        _image(tmp_path / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png", i, fmt="PNG")
        raw[stem] = _raw_labels(i, [0, 1, 7, 8, 24, 26, 33, 34])
        _label(tmp_path / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png", raw[stem])
    expect = {0: 255, 1: 255, 7: 0, 8: 1, 24: 11, 26: 13, 33: 18, 34: 255}
    got = _loaded("cityscapes", tmp_path)
    assert list(got) == sorted(raw)
    for key, (_, label) in got.items():
        np.testing.assert_array_equal(label, np.vectorize(expect.get)(raw[key]))
    assert D.open_dataset("cityscapes", tmp_path).num_classes == 19


def test_ade_loader_shifts_labels_and_ignores_zero(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = {}
    for i in range(2):
        key = f"ADE_val_{i + 1:08d}"
        _image(base / "images/validation" / f"{key}.jpg", i)
        raw[key] = _raw_labels(i, [0, 1, 2, 150])
        _label(base / "annotations/validation" / f"{key}.png", raw[key])
    for key, (_, label) in _loaded("ade", tmp_path).items():
        np.testing.assert_array_equal(label, np.vectorize({0: 255, 1: 0, 2: 1, 150: 149}.get)(raw[key]))
    assert D.open_dataset("ade", tmp_path).num_classes == 150


def test_class_files_have_the_datasets_class_counts():
    counts = {"voc": 21, "context": 60, "coco-object": 81, "coco-stuff": 171, "cityscapes": 19, "ade": 150}
    for name, n in counts.items():
        names = D.class_names(name)
        assert len(names) == n and len(set(names)) == n, name
    assert D.class_names("coco-object")[1:] == D.class_names("coco-stuff")[:80]  # the same 80 things


def test_missing_root_and_wrong_layout_are_one_clear_error(tmp_path):
    with pytest.raises(TTDError, match="does not exist.*JPEGImages"):
        D.open_dataset("voc", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TTDError, match="does not hold the voc layout: expected .*SegmentationClass.*val.txt"):
        D.open_dataset("voc", tmp_path / "empty")
    with pytest.raises(TTDError, match="leftImg8bit/val"):
        D.open_dataset("cityscapes", tmp_path / "empty")
    with pytest.raises(TTDError, match="unknown segmentation dataset"):
        D.open_dataset("kitti", tmp_path)


def test_bad_samples_are_reported_and_skipped(voc_root):
    root, labels = voc_root
    base = root / "VOCdevkit/VOC2012"
    keys = list(labels)
    (base / "JPEGImages" / f"{keys[0]}.jpg").write_bytes(b"not a jpeg")
    _label(base / "SegmentationClass" / f"{keys[1]}.png", np.zeros((H + 1, W), np.uint8), palette=True)
    errors = []
    good = [s.key for s in D.open_dataset("voc", root).samples(errors.append)]
    assert good == keys[2:]
    assert [(e.key, e.error_type) for e in errors] == [(keys[0], "corrupt_image"), (keys[1], "size_mismatch")]


# ---- metrics ---------------------------------------------------------------------------------------------------------
LABEL = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 1, 0]])


def test_metrics_hand_computed():
    # valid pixels (t, p): (0,0) (0,1) (1,1) (1,1) (2,1); the last pixel is ignored
    # class 0: I=1 P=1 T=2 U=2 | class 1: I=2 P=4 T=2 U=4 | class 2: I=0 P=0 T=1 U=1 | class 3: absent
    c = image_counts(PRED, LABEL, 4)
    assert c["class_id"].tolist() == [0, 1, 2]
    assert c["intersection"].tolist() == [1, 2, 0] and c["predicted"].tolist() == [1, 4, 0]
    assert c["target"].tolist() == [2, 2, 1] and c["union"].tolist() == [2, 4, 1]
    m = reference_metrics(c["intersection"], c["union"], c["predicted"], c["target"])
    assert m["miou"] == pytest.approx(100 * (0.5 + 0.5 + 0) / 3)
    assert m["mfpr"] == pytest.approx(100 * (0 + 0.5 + 0) / 3)
    assert m["mfnr"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert m["aacc"] == pytest.approx(60.0) and m["macc"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)


def _brute_counts(pred, label, num_classes):
    """Per-class boolean masks, written out: no code shared with the bincount implementation."""
    valid = label != 255
    rows = {k: [] for k in ("intersection", "union", "predicted", "target")}
    for c in range(num_classes):
        p, t = (pred == c) & valid, (label == c) & valid
        rows["intersection"].append(int((p & t).sum()))
        rows["union"].append(int((p | t).sum()))
        rows["predicted"].append(int(p.sum()))
        rows["target"].append(int(t.sum()))
    return {k: np.array(v) for k, v in rows.items()}


def _random_eval(seed=0, images=6, num_classes=7):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(images):
        label = rng.integers(0, num_classes - 1, (9, 11))  # the last class never appears in the ground truth
        label[rng.random(label.shape) < 0.1] = 255
        pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, num_classes, label.shape))
        pred[pred == 255] = 0
        pred[pred == 2] = 3  # class 2 never predicted
        out.append((f"k{i}", pred, label))
    return out


def _counts_arrow(samples, num_classes):
    rows = []
    for key, pred, label in samples:
        c = image_counts(pred, label, num_classes)
        for j in range(len(c["class_id"])):
            rows.append({"dataset": "x", "key": key, "class_id": int(c["class_id"][j]), "class_name": "c",
                         **{f: int(c[f][j]) for f in ("intersection", "union", "predicted", "target")}})
    return pa.Table.from_pylist(rows)


def test_counts_and_reference_metrics_against_brute_force():
    samples, n = _random_eval(), 7
    tot = {k: np.zeros(n, np.int64) for k in ("intersection", "union", "predicted", "target")}
    for _, pred, label in samples:
        brute = _brute_counts(pred, label, n)
        conf = confusion(pred, label, n)
        assert conf.sum() == (label != 255).sum()
        full = {k: np.zeros(n, np.int64) for k in brute}
        c = image_counts(pred, label, n)
        for k in full:
            full[k][c["class_id"]] = c[k]
            np.testing.assert_array_equal(full[k], brute[k])
            tot[k] += brute[k]
    m = reference_metrics(**tot)
    seen = tot["union"] > 0
    assert seen.sum() == n  # class 2 is in the ground truth, class 6 in the predictions: both count
    iou = tot["intersection"][seen] / tot["union"][seen]
    i, u = tot["intersection"][seen], tot["union"][seen]
    assert m["miou"] == pytest.approx(100 * iou.mean())
    assert m["mfpr"] == pytest.approx(100 * np.mean((tot["predicted"][seen] - i) / u))
    assert m["mfnr"] == pytest.approx(100 * np.mean((tot["target"][seen] - i) / u))
    assert m["miou"] + m["mfpr"] + m["mfnr"] == pytest.approx(100)


def test_iou_fpr_fnr_sum_to_one_per_class():
    samples = _random_eval(seed=3)
    tot = totals(_counts_arrow(samples, 7), 7)
    rates = per_class(**{k: tot[k] for k in ("intersection", "union", "predicted", "target")})
    seen = tot["union"] > 0
    np.testing.assert_allclose((rates["iou"] + rates["fpr"] + rates["fnr"])[seen], 1.0)
    assert np.isnan(per_class([0], [0], [0], [0])["iou"]).all()  # no union: undefined, not 0


def test_sql_metrics_equal_reference():
    for seed in range(3):
        table = _counts_arrow(_random_eval(seed=seed), 7)
        ref = reference_metrics(**{k: v for k, v in totals(table, 7).items()})
        got = sql_metrics_of(table, "r1")
        for name, value in ref.items():
            assert got[name] == pytest.approx(value, rel=1e-12), name
    # per-class SQL: IoU + FPR + FNR = 100 for every class
    con = duckdb.connect()
    con.register("eval_counts", table.append_column("run", pa.array(["r1"] * table.num_rows)))
    rows = con.execute(PER_CLASS_SQL, {"run": "r1"}).fetchall()
    assert len(rows) == 7 and all(r[2] + r[3] + r[4] == pytest.approx(100) for r in rows)
    assert np.isnan(sql_metrics_of(table.slice(0, 0), "r1")["miou"])  # no counts: no metric, not a crash


# ---- inference -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro():
    bundle = load_model("ttd-micro", seed=1)
    with torch.no_grad():  # random init leaves LayerNorms at identity: perturb so features vary with position
        for p in bundle.model.visual.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return bundle


def test_window_boxes_cover_the_image_mmseg_style():
    assert window_boxes(10, 25, 10, 5) == [(0, 0, 10, 10), (0, 5, 10, 10), (0, 10, 10, 10), (0, 15, 10, 10)]
    assert window_boxes(6, 30, 10, 7) == [(0, 0, 6, 10), (0, 7, 6, 10), (0, 14, 6, 10), (0, 20, 6, 10)]
    assert window_boxes(5, 8, 10, 5) == [(0, 0, 5, 8)]  # smaller than a window: one window of its own size


def test_whole_image_window_equals_direct_forward(micro):
    cfg = SegEvalConfig(short_side=None, window=64, stride=32, scales=(1.0,), flip=False, pamr=False)
    seg = Segmenter(micro, D.class_names("voc"), True, cfg)
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    got = seg.logits([img])[0]
    with torch.no_grad():
        _, dense = encode_image_dense(micro.model, ((img - seg.mean) / seg.std)[None], "maskclip")
        text = seg.classify.emb
        direct = torch.einsum("bhwd,cd->bchw", F.normalize(dense, dim=-1), text)
        direct = F.interpolate(direct, size=(48, 64), mode="bilinear", align_corners=False)[0]
    assert got.shape == (20, 48, 64)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)


def _pixel_features(x):  # "patch 1": each pixel's feature is its own colour, so every window sees the same values
    return x.permute(0, 2, 3, 1) + 3.0


def _pooled_features(x, patch=4):  # a local, flip-equivariant stand-in for a dense head
    return F.avg_pool2d(x, patch).permute(0, 2, 3, 1) + 3.0


CLASSIFY = TextClassifier(torch.eye(3), [0, 1, 2], 3)


def test_a_class_with_synonyms_takes_their_best_logit():
    emb = torch.eye(3)  # three synonyms; the first two name class 0
    classify = TextClassifier(emb, [0, 0, 1], 2)
    dense = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.3], [0.0, 0.2, 0.9]]).view(1, 1, 3, 3)
    logits = classify(dense)
    cos = F.normalize(dense, dim=-1)[0, 0]
    torch.testing.assert_close(logits[0, 0, 0], torch.maximum(cos[:, 0], cos[:, 1]))
    torch.testing.assert_close(logits[0, 1, 0], cos[:, 2])


def test_overlapping_windows_average_back_to_the_whole_image():
    img = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(1))
    kw = dict(scales=(1.0,), flip=False, patch=1)
    whole = multiscale_logits([img], _pixel_features, CLASSIFY, window=64, stride=64, batch_size=4, **kw)[0]
    slid = multiscale_logits([img], _pixel_features, CLASSIFY, window=16, stride=6, batch_size=5, **kw)[0]
    torch.testing.assert_close(slid, whole)


def test_flip_and_scales_average_their_views():
    img = torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(2))
    kw = dict(window=64, stride=32, patch=4, batch_size=8)

    def run(imgs, **over):
        return multiscale_logits(imgs, _pooled_features, CLASSIFY, **{"scales": (1.0,), "flip": False, **over, **kw})

    torch.testing.assert_close(run([img], flip=True)[0], run([img])[0])  # flip-equivariant head: flip changes nothing
    one, two = run([img])[0], run([img], scales=(2.0,))[0]
    torch.testing.assert_close(run([img], scales=(1.0, 2.0))[0], (one + two) / 2)
    # windows of several images share forwards; each image still gets its own result
    other = torch.rand(3, 32, 24, generator=torch.Generator().manual_seed(3))
    both = run([img, other], scales=(1.0, 2.0), flip=True)
    torch.testing.assert_close(both[0], run([img], scales=(1.0, 2.0), flip=True)[0])
    torch.testing.assert_close(both[1], run([other], scales=(1.0, 2.0), flip=True)[0])


def test_windows_of_several_images_go_through_one_forward():
    calls = []

    def spy(x):
        calls.append(x.shape[0])
        return _pooled_features(x)

    imgs = [torch.rand(3, 32, 32) for _ in range(3)]
    multiscale_logits(imgs, spy, CLASSIFY, scales=(1.0,), flip=True, window=16, stride=16, patch=4, batch_size=32)
    assert calls == [24]  # 3 images x 2 flips x 4 windows, one forward


def test_pamr_keeps_a_constant_map_constant():
    img = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([0.2, 0.5, 0.3]).view(3, 1, 1).expand(3, 20, 30).clone()
    torch.testing.assert_close(pamr(img, probs, (1, 2, 4), 10), probs)


def test_pamr_sharpens_a_blurred_edge_onto_the_image_edge():
    h, w = 16, 48
    img = torch.zeros(3, h, w)
    img[:, :, 24:] = 1.0  # the image's edge is at x = 24
    x = torch.arange(w, dtype=torch.float32)
    fg = ((x - 16) / 24).clamp(0, 1).expand(h, w)  # the map's edge: a ramp from x = 16 to 40, crossing 0.5 at 28
    probs = torch.stack([1 - fg, fg])
    step = (x >= 24).long().expand(h, w)
    assert not torch.equal(probs.argmax(0), step)
    refined = pamr(img, probs, (1, 2, 4, 8), 10)
    torch.testing.assert_close(refined.sum(0), torch.ones(h, w))  # still probabilities
    assert torch.equal(refined.argmax(0), step)  # the decision boundary moved onto the image edge
    assert (refined[1, :, 24] - refined[1, :, 23]).min() > 0.5  # one sharp jump there (was 1/24)
    for side in (slice(0, 24), slice(24, w)):  # and less variation on either side of it
        assert np.ptp(refined[1, :, side].numpy()) < 0.5 * np.ptp(probs[1, :, side].numpy())


def test_background_threshold():
    probs = torch.tensor([[0.9, 0.5, 0.3], [0.1, 0.5, 0.7]]).view(2, 1, 3)  # 2 foreground classes, 3 pixels
    assert decide(probs, True, 0.6).tolist() == [[1, 0, 2]]  # best 0.5 < 0.6: background
    assert decide(probs, True, 0.4).tolist() == [[1, 1, 2]]  # a tie goes to the first class
    assert decide(probs, False, 0.6).tolist() == [[0, 0, 1]]  # no background class: threshold unused
    assert resolve_config(SegEvalConfig(), "voc").bg_threshold == 0.40
    assert resolve_config(SegEvalConfig(), "ade").bg_threshold == 0.45
    assert resolve_config(SegEvalConfig(bg_threshold=0.7), "voc").bg_threshold == 0.7


def test_config_defaults_are_the_papers_and_bad_values_are_refused():
    cfg = SegEvalConfig()
    assert (cfg.short_side, cfg.window, cfg.stride, cfg.scales) == (448, 448, 224, (1.0, 0.5, 1.5, 2.0))
    assert cfg.flip and cfg.pamr and cfg.head == "maskclip"
    for bad in ({"stride": 500}, {"scales": ()}, {"unknown": 1}, {"templates": ("no slot",)}):
        with pytest.raises(ValueError):
            SegEvalConfig(**bad)


# ---- the whole run ---------------------------------------------------------------------------------------------------
SMALL = dict(short_side=32, window=32, stride=16, scales=(1.0, 0.5), pamr_iterations=2, pamr_dilations=(1, 2),
             batch_size=8, images_per_step=2)


def test_run_segeval_on_voc_writes_counts_and_metrics_and_skips_a_rerun(voc_root, tmp_path):
    from ttd.cli.segmentation import evaluate_segmentation_command
    from ttd.eval.segmentation import run_segeval
    from ttd.store.sql import query
    from ttd.store.store import Store

    root, labels = voc_root
    store = str(tmp_path / "store")
    seen = []
    first = run_segeval("voc", root, store, SegEvalConfig(**SMALL), model="ttd-micro", progress=seen.append)
    assert not first["skipped"] and first["images"] == 3 and first["errors"] == 0
    assert seen[-1] == {"done": 3, "total": 3}

    counts = query(store, "SELECT * FROM eval_counts ORDER BY key, class_id")
    assert set(counts["run"].to_pylist()) == {first["run"]}
    by_key = {}
    for row in counts.to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    assert set(by_key) == set(labels)
    for key, rows in by_key.items():  # every valid pixel is predicted once and is in the target once
        valid = int((labels[key] != 255).sum())
        assert sum(r["predicted"] for r in rows) == valid and sum(r["target"] for r in rows) == valid
        assert all(r["class_name"] == D.class_names("voc")[r["class_id"]] for r in rows)

    stored = {r["metric"]: r["value"] for r in query(store, "SELECT metric, value FROM metrics").to_pylist()}
    ref = reference_metrics(**totals(counts, 21))
    for name in ("miou", "mfpr", "mfnr", "aacc", "macc"):
        assert stored[name] == pytest.approx(ref[name]) and first["metrics"][name] == pytest.approx(ref[name])
    assert stored["miou"] + stored["mfpr"] + stored["mfnr"] == pytest.approx(100)
    fps = query(store, "SELECT DISTINCT fingerprint, model_id FROM metrics").to_pylist()
    assert fps == [{"fingerprint": first["fingerprint"], "model_id": "ttd-micro@random-seed0"}]

    manifest = Store(store).manifest("evaluate", {"run": first["run"]})
    second = run_segeval("voc", root, store, SegEvalConfig(**{**SMALL, "batch_size": 3}), model="ttd-micro")
    assert second["skipped"] and second["run"] == first["run"]  # a speed setting is not a new run
    assert second["metrics"] == pytest.approx(first["metrics"])
    assert Store(store).manifest("evaluate", {"run": first["run"]})["committed_at"] == manifest["committed_at"]

    # the CLI body: JSON on stdout; everything background with threshold 1.0 (a new run)
    config = tmp_path / "seg.yaml"
    config.write_text(json.dumps({**SMALL, "bg_threshold": 1.0, "scales": [1.0], "flip": False}))
    summary = evaluate_segmentation_command("voc", str(root), store, model="ttd-micro", config_path=str(config),
                                            max_images=2, as_json=True)
    assert summary["images"] == 2 and summary["run"] != first["run"]
    bg = query(store, f"SELECT sum(predicted) FILTER (WHERE class_id = 0) AS bg, sum(predicted) AS total "
                      f"FROM eval_counts WHERE run = '{summary['run']}'").to_pylist()[0]
    assert bg["bg"] == bg["total"] > 0


def test_run_records_bad_samples_as_errors_and_evaluates_the_rest(voc_root, tmp_path):
    from ttd.eval.segmentation import run_segeval
    from ttd.store.sql import query

    root, labels = voc_root
    bad = list(labels)[1]
    (root / "VOCdevkit/VOC2012/JPEGImages" / f"{bad}.jpg").write_bytes(b"")
    store = str(tmp_path / "store")
    summary = run_segeval("voc", root, store, SegEvalConfig(**{**SMALL, "pamr": False}), model="ttd-micro")
    assert summary["images"] == 2 and summary["errors"] == 1
    errors = query(store, "SELECT key, stage, error_type, corpus, shard FROM errors").to_pylist()
    assert errors == [{"key": bad, "stage": "evaluate", "error_type": "corrupt_image", "corpus": "voc",
                       "shard": summary["run"]}]
    assert bad not in query(store, "SELECT DISTINCT key FROM eval_counts")["key"].to_pylist()
    assert run_segeval("voc", root, store, SegEvalConfig(**{**SMALL, "pamr": False}), model="ttd-micro")["errors"] == 1


def test_cli_body_prints_json_and_rejects_unknown_dataset(voc_root, tmp_path, capsys):
    from ttd.cli.segmentation import evaluate_segmentation_command

    root, _ = voc_root
    with pytest.raises(TTDError, match="--dataset must be one of"):
        evaluate_segmentation_command("kitti", str(root), str(tmp_path / "s"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**SMALL, "pamr": False, "scales": [1.0]}))
    evaluate_segmentation_command("voc", str(root), str(tmp_path / "s"), model="ttd-micro", config_path=str(cfg),
                                  as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert {"miou", "mfpr", "mfnr"} <= set(doc["metrics"]) and doc["images"] == 3
