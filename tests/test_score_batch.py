"""The scorer's batched per-batch computation: same numbers as the per-sample reference, one device discipline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ttd.models.relevancy import normalise, raw_scores
from ttd.stages.score_batch import Candidates, DeviceMismatch, ShardCandidates, batch_tables, compute, to_host
from ttd.store.heatmap import quantise

NORMS = {"pixel": ("minmax", 100.0), "image": ("softmax", 100.0), "text": ("softmax", 50.0)}


def _inputs(seed: int = 0, b: int = 5, grid=(4, 6), d: int = 16, tags: int = 12):
    g = torch.Generator().manual_seed(seed)
    global_emb = torch.randn(b, d, generator=g)
    dense = torch.randn(b, *grid, d, generator=g)
    caption = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    matrix = torch.nn.functional.normalize(torch.randn(tags, d, generator=g), dim=-1)
    rows = [[int(i) for i in torch.randperm(tags, generator=g)[:n]] for n in (3, 1, 7, 2, 5)[:b]]
    return global_emb, dense, caption, matrix, rows


def test_batched_scores_equal_the_per_sample_loop():
    global_emb, dense, caption, matrix, rows = _inputs()
    out = to_host(compute(global_emb, dense, caption, matrix, Candidates.pack(rows), normalisation=NORMS,
                          selection="pixel", threshold=0.5))
    for b, r in enumerate(rows):
        pixel, image, text, maps = raw_scores(global_emb[b], dense[b], caption[b], matrix[r])
        n = len(r)
        for name, ref in (("pixel", pixel), ("image", image), ("text", text)):
            np.testing.assert_allclose(out[f"{name}_raw"][b, :n], ref.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[f"{name}_score"][b, :n], normalise(ref.numpy(), *NORMS[name]), atol=1e-5)
        assert (out["selected"][b, :n] == (normalise(pixel.numpy(), "minmax") >= 0.5)).all()
        assert not out["selected"][b, n:].any()  # padding is never selected
        for t in range(n):
            data, lo, hi = quantise(maps[t].numpy())
            q = np.frombuffer(data, np.uint8)
            ours = out["heatmap"][b, t].reshape(-1).astype(int)
            assert np.abs(ours - q.astype(int)).max() <= 1  # rounding at .5 only
            assert out["vmin"][b, t] == pytest.approx(lo, abs=1e-6)
            assert out["vmax"][b, t] == pytest.approx(hi, abs=1e-6)
    assert out["pixel_score"][1, 0] == 1.0  # a single candidate maps to 1, as the per-caption normalise does


def test_batch_tables_hold_every_candidate_and_the_selected_masks():
    global_emb, dense, caption, matrix, rows = _inputs(1)
    host = to_host(compute(global_emb, dense, caption, matrix, Candidates.pack(rows), normalisation=NORMS,
                           selection="pixel", threshold=0.5))
    keys = [f"k{b}" for b in range(len(rows))]
    candidates = pa.table({"tag_index": [i for r in rows for i in range(len(r))],
                           "text": [f"t{b}.{i}" for b, r in enumerate(rows) for i in range(len(r))]})
    counts = np.array([len(r) for r in rows])
    rel, masks = batch_tables(host, keys, counts, candidates, threshold=0.5, model_id="m", head="maskclip",
                              masks_for="selected")
    assert rel.num_rows == sum(map(len, rows)) and rel.column("key").to_pylist()[:3] == ["k0"] * 3
    assert rel.column("text").to_pylist()[3] == "t1.0"
    assert masks.num_rows == sum(rel.column("selected").to_pylist())
    assert all(len(h) == 24 for h in masks.column("heatmap").to_pylist())
    sel = [i for i, s in enumerate(rel.column("selected").to_pylist()) if s]
    assert masks.column("key").to_pylist() == [rel.column("key").to_pylist()[i] for i in sel]


def test_a_tensor_on_another_device_is_refused_at_the_boundary():
    """What failed on the first CUDA batch: caption embeddings left on the CPU met the image features on the GPU.
    With no GPU here, the `meta` device stands in for it: the batch computation runs there shape for shape."""
    global_emb, dense, caption, matrix, rows = _inputs()
    meta = torch.device("meta")
    cands = Candidates.pack(rows).to(meta)
    out = compute(global_emb.to(meta), dense.to(meta), caption.to(meta), matrix.to(meta), cands,
                  normalisation=NORMS, selection="pixel", threshold=0.5)
    assert all(v.device == meta for v in out.values()) and out["heatmap"].shape == (5, 7, 4, 6)
    with pytest.raises(DeviceMismatch, match="caption_emb is on cpu, the model on meta"):
        compute(global_emb.to(meta), dense.to(meta), caption, matrix.to(meta), cands, normalisation=NORMS,
                selection="pixel", threshold=0.5)


def test_shard_candidates_gather_each_samples_tags_in_order():
    tags = pa.table({"key": ["b", "a", "b", "c", "a", "b"], "tag_index": [0, 0, 1, 0, 1, 2],
                     "text": ["b0", "a0", "b1", "c0", "a1", "b2"], "lower": ["x", "y", "x", "z", "x", "w"]})
    shard = ShardCandidates(tags)
    assert "a" in shard and "d" not in shard and shard.vocabulary() == ["w", "x", "y", "z"]
    idx, counts = shard.rows(["c", "a", "b"])
    assert counts.tolist() == [1, 2, 3]
    assert shard.table.column("text").take(pa.array(idx)).to_pylist() == ["c0", "a0", "a1", "b0", "b1", "b2"]
    packed = Candidates.from_flat(np.array([7, 1, 2, 3, 4, 5]), counts)
    assert packed.index.tolist() == [[7, 0, 0], [1, 2, 0], [3, 4, 5]]
    assert packed.valid.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_the_baselines_softmax_over_a_captions_tags_by_hand():
    """The paper's image-tag and text-tag scoring: a distribution over the caption's tags at CLIP's temperature.
    Cosines 0.30, 0.28, 0.20 at logit scale 100: exp(0), exp(-2), exp(-10) over their sum, so one tag passes 0.5;
    min-max would pass two (1.0, 0.8)."""
    cos = np.array([0.30, 0.28, 0.20], np.float32)
    z = 1 + np.exp(-2.0) + np.exp(-10.0)
    expected = [1 / z, np.exp(-2.0) / z, np.exp(-10.0) / z]  # 0.8807, 0.1192, 0.0000400
    np.testing.assert_allclose(normalise(cos, "softmax", 100.0), expected, rtol=1e-5)
    assert (normalise(cos, "softmax", 100.0) >= 0.5).tolist() == [True, False, False]
    assert (normalise(cos, "minmax") >= 0.5).tolist() == [True, True, False]
    # the batched form: padding ignored (gets 0), each row its own distribution
    x = torch.tensor([[0.30, 0.28, 0.20], [0.5, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    from ttd.stages.score_batch import normalise_rows

    rows = normalise_rows(x, valid, "softmax", 100.0).numpy()
    np.testing.assert_allclose(rows[0], expected, rtol=1e-5)
    assert rows[1].tolist() == [1.0, 0.0, 0.0]


def test_the_softmax_temperature_is_clips_or_the_models_logit_scale():
    from ttd.configs import ScoreConfig
    from ttd.models import load_model
    from ttd.models.relevancy import model_logit_scale, normalisations

    model = load_model("ttd-micro", None, device="cpu").model
    with torch.no_grad():
        model.logit_scale.fill_(np.log(42.0))
    assert model_logit_scale(model) == pytest.approx(42.0)
    assert normalisations(ScoreConfig(), model)["image"] == ("softmax", 100.0)  # CLIP's, by default
    assert normalisations(ScoreConfig(logit_scale=None), model)["image"] == ("softmax", pytest.approx(42.0))
    assert normalisations(ScoreConfig(logit_scale=7.0), model)["text"] == ("softmax", 7.0)
    assert normalisations(ScoreConfig(), model)["pixel"][0] == "minmax"
