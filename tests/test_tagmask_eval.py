"""TagMask metrics against hand-computed cases and a numpy reference; the evaluation end to end."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from ttd.eval.metrics_sql import CAPTION_CLASS_ID, SELECTED_UNION_CLASS_ID, tagmask_metrics
from ttd.eval.tagmask import (
    caption_counts,
    noun_predictions,
    run_tagmask_eval,
    selected_union,
    table_text,
    word_targets,
)
from ttd.store import schemas


def predictions(rows):
    cols = ["dataset", "key", "method", "word_index", "word", "score", "predicted", "target"]
    return pa.Table.from_pylist([dict(zip(cols, ("tagmask",) + r)) for r in rows],
                                schema=schemas.get("eval_predictions").arrow)


def counts(rows):
    cols = ["dataset", "key", "class_id", "class_name", "intersection", "union", "predicted", "target"]
    return pa.Table.from_pylist([dict(zip(cols, ("tagmask",) + r)) for r in rows],
                                schema=schemas.get("eval_counts").arrow)


def as_dict(rows):
    return {(r["method"], r["metric"]): r["value"] for r in rows}


# key, method, word_index, word, score, predicted, target
HAND = [
    ("a", "pixel", 0, "dog", 0.9, True, True),
    ("a", "pixel", 1, "on", 0.1, False, False),
    ("a", "pixel", 2, "cat", 0.6, True, True),
    ("a", "pixel", 3, "time", 0.7, True, False),
    ("b", "pixel", 0, "car", 0.2, False, True),
    ("b", "pixel", 1, "tree", 1.0, True, True),
    ("b", "pixel", 2, "sky", 0.0, False, False),
]


def test_classification_metrics_by_hand():
    m = as_dict(tagmask_metrics(predictions(HAND), counts([])))
    # tp=3 (dog, cat, tree), fp=1 (time), fn=1 (car), tn=2 (on, sky)
    assert m[("pixel", "precision")] == pytest.approx(75.0)
    assert m[("pixel", "recall")] == pytest.approx(75.0)
    assert m[("pixel", "f1")] == pytest.approx(75.0)
    assert m[("pixel", "accuracy")] == pytest.approx(100 * 5 / 7)
    # AP(a): ranks dog(1,T) time(2,F) cat(3,T) on(4,F): (1/1 + 2/3) / 2; AP(b): tree(1,T) car(2,T): 1
    assert m[("pixel", "map")] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    # both captions have 2 true tags; a selects 2, b selects 1 -> half are single-tag
    assert m[("pixel", "single_tag_share")] == pytest.approx(50.0)


def reference_ap(scores, targets):
    order = np.argsort(-np.asarray(scores), kind="stable")
    t = np.asarray(targets)[order]
    hits = np.cumsum(t)
    return float(np.mean((hits / np.arange(1, len(t) + 1))[t])) if t.any() else None


def test_metrics_equal_a_numpy_reference_on_random_data():
    rng = np.random.default_rng(0)
    rows = []
    for k in range(40):
        n = int(rng.integers(1, 9))
        scores = rng.random(n)
        targets = rng.random(n) < 0.4
        for j in range(n):
            rows.append((f"k{k}", "pixel", j, f"w{j}", float(scores[j]), bool(scores[j] >= 0.5), bool(targets[j])))
    m = as_dict(tagmask_metrics(predictions(rows), counts([])))
    pred = np.array([r[5] for r in rows])
    targ = np.array([r[6] for r in rows])
    tp, fp, fn = (pred & targ).sum(), (pred & ~targ).sum(), (~pred & targ).sum()
    assert m[("pixel", "f1")] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert m[("pixel", "accuracy")] == pytest.approx(100 * (pred == targ).mean())
    aps = []
    for k in range(40):
        sub = [r for r in rows if r[0] == f"k{k}"]
        ap = reference_ap([r[4] for r in sub], [r[6] for r in sub])
        if ap is not None:
            aps.append(ap)
    assert m[("pixel", "map")] == pytest.approx(100 * np.mean(aps))


def test_caption_segmentation_and_coverage_by_hand():
    class_map = np.zeros((4, 4), np.uint8)
    class_map[0, :] = 3  # a visible tag with 4 pixels
    class_map[3, :2] = 5  # a second visible tag with 2 pixels
    heat = np.zeros((4, 4))
    heat[0, :] = 1.0  # the caption covers tag 3 fully ...
    heat[1, 0] = 1.0  # ... plus one background pixel, and none of tag 5
    mentions = [{"class_id": 3, "class_name": "dog", "visible": True},
                {"class_id": 5, "class_name": "cat", "visible": True},
                {"class_id": 7, "class_name": "bird", "visible": False}]
    rows = caption_counts("k", heat, class_map, mentions, 0.4)
    cap = next(r for r in rows if r["class_id"] == CAPTION_CLASS_ID)
    assert (cap["intersection"], cap["union"], cap["predicted"], cap["target"]) == (4, 7, 5, 6)
    m = as_dict(tagmask_metrics(predictions(HAND), counts([tuple(r[k] for k in ("key", "class_id", "class_name",
                                                                                  "intersection", "union",
                                                                                  "predicted", "target"))
                                                           for r in rows])))
    assert m[("caption", "caption_miou")] == pytest.approx(100 * 4 / 7)
    assert m[("caption", "caption_mfpr")] == pytest.approx(100 * 1 / 7)
    assert m[("caption", "caption_mfnr")] == pytest.approx(100 * 2 / 7)
    iou_fpr_fnr = sum(m[("caption", k)] for k in ("caption_miou", "caption_mfpr", "caption_mfnr"))
    assert iou_fpr_fnr == pytest.approx(100.0)
    assert m[("caption", "coverage_best")] == pytest.approx(100.0)
    assert m[("caption", "coverage_second")] == pytest.approx(0.0)


def test_selected_union_is_the_distill_target_and_scored_apart_from_the_caption():
    # three tags on a 2x2 grid, raw cosine units; the third is not selected and would cover everything
    maps = torch.tensor([[[0.10, 0.30], [0.10, 0.10]],
                         [[0.20, 0.20], [0.20, 0.25]],
                         [[0.90, 0.90], [0.90, 0.80]]])
    union = selected_union(maps, np.array([True, True, False]), (2, 2))
    # each selected map min-max normalised on its own (tag 2: 0 at 0.20, 1 at 0.25), then the pixel-wise max
    np.testing.assert_allclose(union, [[0.0, 1.0], [0.0, 1.0]], atol=1e-6)
    assert selected_union(maps, np.array([False, False, False]), (2, 2)) is None

    class_map = np.array([[0, 3], [5, 5]], np.uint8)  # tag 3 one pixel, tag 5 two pixels
    mentions = [{"class_id": 3, "class_name": "dog", "visible": True},
                {"class_id": 5, "class_name": "cat", "visible": True}]
    heat = np.array([[0.0, 1.0], [0.0, 0.0]])  # the caption covers only the dog
    rows = caption_counts("k", heat, class_map, mentions, 0.4, union)
    row = next(r for r in rows if r["class_id"] == SELECTED_UNION_CLASS_ID)
    assert (row["intersection"], row["union"], row["predicted"], row["target"]) == (2, 3, 2, 3)
    m = as_dict(tagmask_metrics(predictions(HAND), counts([tuple(r[k] for k in (
        "key", "class_id", "class_name", "intersection", "union", "predicted", "target")) for r in rows])))
    assert m[("caption", "caption_miou")] == pytest.approx(100 * 1 / 3)
    assert m[("selected_union", "caption_miou")] == pytest.approx(100 * 2 / 3)
    assert m[("selected_union", "caption_mfnr")] == pytest.approx(100 * 1 / 3)
    # the union row is not a tag class: coverage still ranks the dog (1/1) above the cat (0/2)
    assert m[("caption", "coverage_best")] == pytest.approx(100.0)
    assert m[("caption", "coverage_second")] == pytest.approx(0.0)


def test_word_targets_and_noun_baseline_use_spans():
    mentions = [{"char_start": 2, "char_end": 11, "visible": True},   # "fire truck"
                {"char_start": 20, "char_end": 23, "visible": False}]  # an absent "cat"
    starts, ends = [0, 2, 17, 20], [1, 11, 19, 23]  # a, fire truck, by, cat
    assert word_targets(starts, ends, mentions) == [False, True, False, False]

    class Nouns:
        char_start, char_end = (7, 20), (11, 23)  # "truck", "cat"

    assert noun_predictions(starts, ends, Nouns) == [False, True, False, True]
    assert noun_predictions(starts, ends, ValueError("parse failed")) == [False] * 4


@pytest.mark.slow
def test_evaluation_end_to_end(tmp_path):
    from ttd.synth.generate import synthesize

    synthesize(str(tmp_path / "synth"), train=0, eval=24, seed=5)
    store = str(tmp_path / "store")
    first = run_tagmask_eval(str(tmp_path / "synth" / "eval"), store, model="ttd-micro")
    assert not first["skipped"] and first["samples"] == 24
    for method in ("pixel", "image", "text", "noun"):
        assert 0 <= first["metrics"][method]["f1"] <= 100
    assert "pixel-tag" in table_text(first["metrics"])
    again = run_tagmask_eval(str(tmp_path / "synth" / "eval"), store, model="ttd-micro")
    assert again["skipped"] and again["metrics"] == first["metrics"]


def test_the_papers_caption_protocol_by_name():
    """448 short side, four scales, flip and PAMR: the paper's segmentation protocol, named `paper`."""
    from ttd.configs import CaptionProtocol, TagmaskEvalConfig

    proto = TagmaskEvalConfig(caption="paper").caption
    assert (proto.short_side, proto.scales, proto.flip, proto.pamr) == (448, (1.0, 0.5, 1.5, 2.0), True, True)
    assert (proto.window, proto.stride) == (448, 224)
    assert TagmaskEvalConfig().caption == CaptionProtocol() and CaptionProtocol().short_side is None
    assert TagmaskEvalConfig(caption="paper").bg_threshold == 0.4
    with pytest.raises(ValueError, match="unknown caption protocol"):
        TagmaskEvalConfig(caption="pape")


def test_flipped_features_are_mirror_symmetric():
    """`flip`: features averaged with the mirror image's (mirrored back), so a mirrored image gets exactly the
    mirrored map, which one forward alone does not (the patch grid is not symmetric)."""
    from ttd.models import load_model
    from ttd.models.relevancy import dense_features

    model = load_model("ttd-micro", None, device="cpu").model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g, d = dense_features(model, x, "maskclip", flip=True)
        gm, dm = dense_features(model, x.flip(-1), "maskclip", flip=True)
        _, d1 = dense_features(model, x, "maskclip")
        _, dm1 = dense_features(model, x.flip(-1), "maskclip")
    assert torch.allclose(dm, d.flip(2), atol=1e-5) and torch.allclose(gm, g, atol=1e-5)
    assert not torch.allclose(dm1, d1.flip(2), atol=1e-3)


@pytest.mark.slow
def test_the_papers_caption_protocol_end_to_end(tmp_path):
    from ttd.configs import TagmaskEvalConfig
    from ttd.synth.generate import synthesize

    synthesize(str(tmp_path / "synth"), train=0, eval=3, seed=5)
    root, store = str(tmp_path / "synth" / "eval"), str(tmp_path / "store")
    single = run_tagmask_eval(root, store, TagmaskEvalConfig(), model="ttd-micro")
    paper = run_tagmask_eval(root, store, TagmaskEvalConfig(caption="paper"), model="ttd-micro")
    assert paper["run"] != single["run"] and not paper["skipped"]  # the protocol is part of the run's identity
    assert paper["metrics"]["pixel"] == single["metrics"]["pixel"]  # tag selection does not depend on it
    assert 0 <= paper["metrics"]["caption"]["caption_miou"] <= 100
    assert paper["metrics"]["caption"] != single["metrics"]["caption"]
