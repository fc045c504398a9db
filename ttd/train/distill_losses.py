"""TTD's losses (docs/METHOD.md says which forms come from the paper and which are ours):

- `L_distill`: the caption's heatmap against the union (pixel-wise max) of its selected tags' normalised maps;
- `L_tag`: each candidate tag's heatmap against its own normalised map when selected, a zero map when not;
- `L_contrastive` (optional): CLIP's loss on the batch's image and caption embeddings, to stay near pre-training.

The prediction is never min-max normalised (its maximum would always be 1 and a zero target could never be met,
which collapses the dense features): the target is mapped into the prediction's own current range [lo, hi], held
constant (no gradient), and compared with the raw map, scaled by `heatmap_scale`. A zero target then means "as
low as your lowest pixel", which can be met.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttd.configs import DistillConfig
from ttd.models.dense import encode_image_dense
from ttd.models.relevancy import encode_trimmed, trimmable
from ttd.train.distill_data import Batch


def _distance(pred: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    diff = pred - target
    return diff.pow(2) if form == "mse" else diff.abs()


def scaled_target(pred: torch.Tensor, target01: torch.Tensor, contrast: torch.Tensor | None = None) -> torch.Tensor:
    """A [0, 1] target map placed into each predicted map's own range: lo + t * max(hi - lo, contrast), per map,
    without gradient. `contrast` [N] (the teacher's own range for that map) keeps a flat map from meeting a
    target that has a peak: without it, flattening every map makes every loss zero (the collapse we measured)."""
    flat = pred.detach().flatten(-2)
    lo = flat.amin(-1)
    span = flat.amax(-1) - lo
    if contrast is not None:
        span = torch.maximum(span, contrast.to(span.dtype))
    return lo[..., None, None] + target01 * span[..., None, None]


def distill_loss(caption_maps: torch.Tensor, union: torch.Tensor, has_selected: torch.Tensor, *,
                 scale: float, form: str = "mse", contrast: torch.Tensor | None = None) -> torch.Tensor:
    """L_distill: caption heatmaps [B, h, w] against the union of their selected tags' maps [B, h, w]; samples
    without a selected tag [B] bool do not count. `contrast` [B]: the least range the caption map must span."""
    if not bool(has_selected.any()):
        return caption_maps.sum() * 0.0
    pred, union = caption_maps[has_selected], union[has_selected]
    floor = contrast[has_selected] if contrast is not None else None
    return _distance(pred * scale, scaled_target(pred, union, floor) * scale, form).mean()


def teacher_tag_targets(targets: torch.Tensor, lo: torch.Tensor, contrast: torch.Tensor, selected: torch.Tensor,
                        sample_of_tag: torch.Tensor, batch: int) -> torch.Tensor:
    """Raw-cosine targets for L_tag: a selected tag's teacher map (lo + t * contrast, exactly the stored map); an
    unselected tag's flat map at its sample's background level (the lowest `lo` of the sample's selected tags).
    Absolute levels, so an irrelevant tag cannot stay high by being flat, and a selected one cannot flatten."""
    background = torch.full((batch,), float("inf"), device=targets.device)
    sel = selected.nonzero().flatten()
    background.scatter_reduce_(0, sample_of_tag[sel], lo[sel], "amin")
    raw = lo[:, None, None] + targets * contrast[:, None, None]
    floor = background[sample_of_tag][:, None, None].expand_as(raw)
    return torch.where(selected[:, None, None], raw, floor)


def raw_tag_loss(tag_maps: torch.Tensor, raw_targets: torch.Tensor, *, scale: float, form: str = "mse"
                 ) -> torch.Tensor:
    """L_tag against absolute (raw cosine) targets; tags of samples without any selected tag do not count."""
    valid = torch.isfinite(raw_targets[:, 0, 0])
    if not bool(valid.any()):
        return tag_maps.sum() * 0.0
    return _distance(tag_maps[valid] * scale, raw_targets[valid] * scale, form).mean()


def tag_loss(tag_maps: torch.Tensor, targets: torch.Tensor, *, scale: float, form: str = "mse",
             contrast: torch.Tensor | None = None) -> torch.Tensor:
    """L_tag: each tag heatmap [M, h, w] against its own normalised map, or zeros for an unselected tag.
    `contrast` [M]: the least range each map must span (the teacher's range for a selected tag, 0 otherwise)."""
    if tag_maps.shape[0] == 0:
        return tag_maps.sum() * 0.0
    return _distance(tag_maps * scale, scaled_target(tag_maps, targets, contrast) * scale, form).mean()


def union_of_selected(targets: torch.Tensor, sample_of_tag: torch.Tensor, selected: torch.Tensor,
                      batch: int, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise max of each sample's selected tag maps: ([B, h, w], has_selected [B]); binarised at `threshold`
    when given (an ablation: the paper's target is the soft union)."""
    h, w = targets.shape[-2:]
    union = torch.zeros(batch, h, w, dtype=targets.dtype, device=targets.device)
    sel = selected.nonzero().flatten()
    if len(sel):
        flat = targets[sel].flatten(1)
        union.view(batch, -1).scatter_reduce_(0, sample_of_tag[sel][:, None].expand_as(flat), flat, "amax")
    has = torch.zeros(batch, dtype=torch.bool, device=targets.device)
    has[sample_of_tag[sel]] = True
    if threshold is not None:
        union = (union >= threshold).to(union.dtype)
    return union, has


def _text_features(model, tokens: torch.Tensor, trim: bool) -> torch.Tensor:
    """Text embeddings with gradients; with `trim`, tokens cut after the longest (exact under CLIP's causal mask)."""
    return encode_trimmed(model, tokens) if trim and trimmable(model) else model.encode_text(tokens)


def losses(model, batch: Batch, config: DistillConfig, clip_loss, *, trim_text: bool = True
           ) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum for one micro-batch (`trim_text` False: the text tower runs on the full
    77 tokens, the naive baseline of benchmarks/gpu_distill.py)."""
    global_emb, dense = encode_image_dense(model, batch.images, config.head)
    dense = F.normalize(dense.float(), dim=-1)
    caption = F.normalize(_text_features(model, batch.tokens, trim_text).float(), dim=-1)
    # with distill_text_only, L_distill (the caption maps' only use) moves the caption embedding, not the patches
    caption_maps = torch.einsum("bhwd,bd->bhw", dense.detach() if config.distill_text_only else dense, caption)
    out: dict[str, torch.Tensor] = {}
    zero = caption_maps.sum() * 0.0
    if len(batch.tag_prompts) and (config.w_tag or config.w_distill):
        tag_emb = _text_features(model, batch.tag_prompts, trim_text).float()
        tag_emb = F.normalize(F.normalize(tag_emb, dim=-1).reshape(-1, batch.n_templates, tag_emb.shape[-1])
                              .mean(1), dim=-1)
        targets = batch.targets
        if targets.shape[-2:] != dense.shape[1:3]:
            targets = F.interpolate(targets[:, None], size=dense.shape[1:3], mode="bilinear",
                                    align_corners=False)[:, 0]
        tag_maps = torch.einsum("mhwd,md->mhw", dense[batch.sample_of_tag], tag_emb[batch.uniq_of_tag])
        union, has = union_of_selected(targets, batch.sample_of_tag, batch.selected, dense.shape[0],
                                       threshold=config.union_threshold)
        caption_contrast = None
        if config.keep_contrast:  # the caption map must span at least its selected tags' narrowest range
            sel = batch.selected.nonzero().flatten()
            caption_contrast = torch.full((dense.shape[0],), float("inf"), device=dense.device)
            caption_contrast.scatter_reduce_(0, batch.sample_of_tag[sel], batch.contrast[sel], "amin")
            caption_contrast = torch.where(torch.isfinite(caption_contrast), caption_contrast, 0.0)
        out["distill"] = distill_loss(caption_maps, union, has, scale=config.heatmap_scale, form=config.loss,
                                      contrast=caption_contrast)
        if config.tag_target == "teacher":  # ours
            raw = teacher_tag_targets(targets, batch.lo, batch.contrast, batch.selected, batch.sample_of_tag,
                                      dense.shape[0])
            out["tag"] = raw_tag_loss(tag_maps, raw, scale=config.heatmap_scale, form=config.loss)
        else:  # the paper's: own normalised map or zero, in the prediction's own range
            out["tag"] = tag_loss(tag_maps, targets, scale=config.heatmap_scale, form=config.loss,
                                  contrast=batch.contrast if config.keep_contrast else None)
    else:
        out["distill"] = out["tag"] = zero
    if config.w_contrastive:
        out["contrastive"] = clip_loss(F.normalize(global_emb.float(), dim=-1), caption, model.logit_scale.exp())
    else:
        out["contrastive"] = zero
    out["loss"] = (config.w_distill * out["distill"] + config.w_tag * out["tag"]
                   + config.w_contrastive * out["contrastive"])
    return out
