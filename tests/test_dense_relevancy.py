"""Dense heads against a direct per-head computation from the last block's weights; scoring on known cases."""

import math

import numpy as np
import pytest
import torch

from ttd.configs import HEADS, ScoreConfig
from ttd.models import load_model
from ttd.models.dense import encode_image_dense
from ttd.models.relevancy import normalise, raw_scores
from ttd.store.heatmap import dequantise, quantise


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    bundle = load_model("ttd-micro", seed=1)
    # random init leaves biases at zero and LayerNorms at identity: perturb them so the reference is exercised
    with torch.no_grad():
        for p in bundle.model.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return bundle


def reference_tokens(visual, images):
    """Everything up to the last block's input, straight from open_clip's own modules."""
    x = visual._embeds(images)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def reference_head(block, x, head, grid):
    """Loop over heads and write every product out; no code shared with ttd.models.dense."""
    attn = block.attn
    width = x.shape[-1]
    nh = attn.num_heads
    d = width // nh
    y = torch.nn.functional.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = y @ w[:width].T + b[:width]
    k = y @ w[width:2 * width].T + b[width:2 * width]
    v = y @ w[2 * width:].T + b[2 * width:]
    if head == "maskclip":
        return v @ attn.out_proj.weight.T + attn.out_proj.bias
    t = x.shape[1]
    gh, gw = grid
    bias = torch.zeros(t, t)
    for i in range(1, t):
        for j in range(1, t):
            yi, xi = divmod(i - 1, gw)
            yj, xj = divmod(j - 1, gw)
            bias[i, j] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * 5.0 ** 2))
    outs = []
    for h in range(nh):
        qh, kh, vh = (z[..., h * d:(h + 1) * d] for z in (q, k, v))
        qq = torch.softmax(qh @ qh.transpose(-1, -2) / math.sqrt(d), -1)
        kk = torch.softmax(kh @ kh.transpose(-1, -2) / math.sqrt(d), -1)
        if head == "clearclip":
            a = qq
        elif head == "sclip":
            a = qq + kk
        else:  # naclip
            a = torch.softmax(kh @ kh.transpose(-1, -2) / math.sqrt(d) + bias, -1)
        outs.append(a @ vh)
    out = torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    if head == "sclip":
        x = x + out
        return x + block.mlp(block.ln_2(x))
    return out


@pytest.mark.parametrize("head", HEADS)
def test_each_dense_head_equals_direct_computation(micro, head):
    visual = micro.model.visual
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        global_emb, dense = encode_image_dense(micro.model, images, head)
        x = reference_tokens(visual, images)
        ref = reference_head(visual.transformer.resblocks[-1], x, head, (8, 8))[:, 1:]
        ref = visual.ln_post(ref) @ visual.proj
        assert dense.shape == (2, 8, 8, micro.embed_dim)
        torch.testing.assert_close(dense.reshape(2, 64, -1), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(global_emb, micro.model.encode_image(images), atol=1e-4, rtol=1e-4)


def test_dense_features_at_other_resolutions(micro):
    with torch.no_grad():
        _, dense = encode_image_dense(micro.model, torch.randn(1, 3, 96, 128), "maskclip")
    assert dense.shape[:3] == (1, 12, 16)


def test_pixel_scoring_known_answer():
    """Patch features built by hand: tag 0 matches one patch exactly, tag 1 is weakly everywhere, tag 2 nowhere."""
    d = 4
    e = torch.eye(d)
    dense = torch.zeros(3, 3, d)
    dense[..., 1] = 1.0  # every patch points mostly along axis 1
    dense[..., 3] = 0.2
    dense[2, 0] = e[0] * 5  # one patch is exactly axis 0
    tags = torch.stack([e[0], torch.nn.functional.normalize(e[1] + e[2], dim=0), -e[3]])
    global_emb = dense.mean(dim=(0, 1))
    caption = torch.nn.functional.normalize(e[1] + e[3], dim=0)
    pixel, image, text, maps = raw_scores(global_emb, dense, caption, tags)
    assert maps.shape == (3, 3, 3)
    assert pixel[0] == pytest.approx(1.0)  # its best pixel is a perfect match
    assert int(maps[0].argmax()) == 6  # at row 2, column 0
    assert pixel[1] == pytest.approx(1 / math.sqrt(2) / math.sqrt(1.04), rel=1e-5)
    assert pixel[2] == pytest.approx(0.0, abs=1e-6)  # -e3 never beats the all-zero patch
    # the image-level score ranks the small object (tag 0) below the diffuse one: that is the bias TTD removes
    assert image[0] < image[1]
    assert pixel[0] > pixel[1]
    norm = normalise(pixel.numpy(), "minmax")
    np.testing.assert_allclose(norm, [1.0, (pixel[1] - pixel[2]) / (pixel[0] - pixel[2]), 0.0], rtol=1e-5)
    assert ((norm >= ScoreConfig().threshold) == np.array([True, True, False])).all()


def test_normalise_edge_cases():
    assert normalise(np.array([0.3]), "minmax").tolist() == [1.0]
    assert normalise(np.array([0.2, 0.2]), "minmax").tolist() == [1.0, 1.0]
    assert normalise(np.array([], dtype=np.float32), "minmax").size == 0
    assert normalise(np.array([0.1, 0.3]), "none").tolist() == pytest.approx([0.1, 0.3])


def test_quantise_roundtrip():
    hm = np.random.default_rng(0).normal(size=(14, 14)).astype(np.float32)
    data, lo, hi = quantise(hm)
    assert len(data) == 196
    back = dequantise(data, 14, 14, lo, hi)
    assert np.abs(back - hm).max() <= (hi - lo) / 255 / 2 + 1e-6
    flat, lo, hi = quantise(np.full((2, 2), 0.5))
    assert flat == bytes(4) and lo == hi == 0.5


def test_score_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ScoreConfig(threshold=1.5)
    with pytest.raises(ValueError):
        ScoreConfig(templates=("no slot",))
    with pytest.raises(ValueError):
        ScoreConfig(head="gradcam")
    with pytest.raises(ValueError):
        ScoreConfig(unknown=1)
