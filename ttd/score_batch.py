"""The scorer's work on one batch of images, batched on the model's device, and its rows for the store.

Device discipline: `compute` takes every tensor it combines with the model's outputs through `on_device`, which
refuses a tensor on another device with one line naming it (the CUDA bug this module replaced: caption embeddings
left on the CPU met CUDA image features on the first batch). Nothing here calls `.cpu()` but `to_host`, once per
batch, after all the work is queued on the device.

Per batch, instead of a Python loop over samples and tags: the candidates are padded into a [B, T] index into the
shard's tag-embedding matrix (kept on the device), gathered once, and scored with one batched matmul against the
patch embeddings; min-max normalisation per caption and the uint8 quantisation of every heatmap run on the device;
Arrow columns are built from the host arrays without per-row dicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from . import schemas

SCORES = ("pixel", "image", "text")


class DeviceMismatch(RuntimeError):
    """A tensor reached the batch computation on another device than the model's."""


def on_device(device: torch.device, **tensors: torch.Tensor) -> None:
    """Refuse tensors that are not on `device` (the model's): mixing devices fails later, on CUDA only, and far
    from the cause."""
    for name, t in tensors.items():
        if t.device != device:
            raise DeviceMismatch(f"{name} is on {t.device}, the model on {device}: move it with .to(device) where it "
                                 "is made")


@dataclass
class Candidates:
    """One batch's candidate tags, padded: `index[b, t]` is the row of sample b's t-th candidate in the shard's
    tag-embedding matrix (0 where padded), `valid[b, t]` marks real candidates."""

    index: torch.Tensor  # [B, T] int64
    valid: torch.Tensor  # [B, T] bool

    @classmethod
    def pack(cls, rows: list[list[int]]) -> Candidates:
        width = max((len(r) for r in rows), default=0)
        index = np.zeros((len(rows), max(width, 1)), np.int64)
        valid = np.zeros(index.shape, bool)
        for b, r in enumerate(rows):
            index[b, :len(r)] = r
            valid[b, :len(r)] = True
        return cls(torch.from_numpy(index), torch.from_numpy(valid))

    def to(self, device: torch.device) -> Candidates:
        return Candidates(self.index.to(device, non_blocking=True), self.valid.to(device, non_blocking=True))


def normalise_rows(x: torch.Tensor, valid: torch.Tensor, method: str) -> torch.Tensor:
    """Min-max across each caption's candidates (padding ignored); a caption whose candidates all score the same
    maps to 1, as `relevancy.normalise` does for one caption."""
    if method == "none":
        return x
    big = torch.finfo(x.dtype).max
    lo = torch.where(valid, x, big).amin(dim=1, keepdim=True)
    hi = torch.where(valid, x, -big).amax(dim=1, keepdim=True)
    span = hi - lo
    return torch.where(span < 1e-8, torch.ones_like(x), (x - lo) / span.clamp_min(1e-8))


@torch.no_grad()
def compute(global_emb: torch.Tensor, dense: torch.Tensor, caption_emb: torch.Tensor, tag_matrix: torch.Tensor,
            cands: Candidates, *, normalisation: str, selection: str, threshold: float) -> dict[str, torch.Tensor]:
    """Raw and normalised pixel/image/text scores [B, T], the selection [B, T], and each heatmap quantised to uint8
    [B, T, gh, gw] with its value range [B, T]; all on the model's device (that of `dense`)."""
    device = dense.device
    on_device(device, global_emb=global_emb, caption_emb=caption_emb, tag_matrix=tag_matrix,
              candidate_index=cands.index, candidate_valid=cands.valid)
    b, gh, gw, d = dense.shape
    tags = tag_matrix.float()[cands.index]  # [B, T, D]: one gather
    patches = F.normalize(dense.float(), dim=-1).reshape(b, gh * gw, d)
    maps = torch.bmm(tags, patches.transpose(1, 2))  # [B, T, HW]: one batched matmul
    raw = {"pixel": maps.amax(dim=2),
           "image": torch.einsum("btd,bd->bt", tags, F.normalize(global_emb.float(), dim=-1)),
           "text": torch.einsum("btd,bd->bt", tags, caption_emb.float())}
    out = {f"{k}_raw": v for k, v in raw.items()}
    out.update({f"{k}_score": normalise_rows(v, cands.valid, normalisation) for k, v in raw.items()})
    out["selected"] = (out[f"{selection}_score"] >= threshold) & cands.valid
    lo, hi = maps.amin(dim=2), raw["pixel"]
    span = (hi - lo).unsqueeze(2)
    scaled = torch.round((maps - lo.unsqueeze(2)) / span.clamp_min(1e-30) * 255)
    out["heatmap"] = torch.where(span < 1e-12, torch.zeros_like(scaled), scaled).to(torch.uint8).reshape(
        *scaled.shape[:2], gh, gw)
    out["vmin"], out["vmax"] = lo, hi
    out["valid"] = cands.valid
    return out


def to_host(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The batch's results on the host: every copy queued without blocking, then one wait."""
    host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
    if any(v.is_cuda for v in out.values()):
        torch.cuda.current_stream().synchronize()
    return {k: v.numpy() for k, v in host.items()}


def batch_tables(host: dict[str, np.ndarray], keys: list[str], cands: list[list[dict]], *, threshold: float,
                 model_id: str, head: str, masks_for: str) -> tuple[pa.Table, pa.Table]:
    """`relevancy` and `masks` rows of one batch, columns built from the host arrays (no per-row dicts)."""
    valid = host["valid"]
    grid = host["heatmap"].shape[2:4]
    n = int(valid.sum())
    sample_of = np.repeat(np.arange(len(keys)), [len(c) for c in cands])
    flat = [c for cs in cands for c in cs]
    key_col = pa.array(np.asarray(keys, dtype=object)[sample_of], pa.string()) if n else pa.array([], pa.string())
    tag_index = pa.array(np.fromiter((c["tag_index"] for c in flat), np.int32, n), pa.int32())
    text = pa.array([c["text"] for c in flat], pa.string())
    rel = {"key": key_col, "tag_index": tag_index, "text": text}
    for name in SCORES:
        rel[f"{name}_raw"] = pa.array(host[f"{name}_raw"][valid].astype(np.float32), pa.float32())
        rel[f"{name}_score"] = pa.array(host[f"{name}_score"][valid].astype(np.float32), pa.float32())
    selected = host["selected"][valid]
    rel["selected"] = pa.array(selected, pa.bool_())
    rel["threshold"] = pa.array(np.full(n, threshold, np.float32), pa.float32())
    rel["model_id"] = pa.array([model_id] * n, pa.string())
    rel["head"] = pa.array([head] * n, pa.string())
    relevancy = pa.Table.from_pydict(rel, schema=schemas.get("relevancy").arrow)

    keep = selected if masks_for == "selected" else np.ones(n, bool)
    m = int(keep.sum())
    cells = grid[0] * grid[1]
    data = np.ascontiguousarray(host["heatmap"][valid][keep]).reshape(-1)
    offsets = np.arange(0, (m + 1) * cells, cells, dtype=np.int32)
    heatmap = pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    masks = pa.Table.from_pydict({
        "key": rel["key"].filter(pa.array(keep)), "tag_index": rel["tag_index"].filter(pa.array(keep)),
        "text": rel["text"].filter(pa.array(keep)),
        "height": pa.array(np.full(m, grid[0], np.int16), pa.int16()),
        "width": pa.array(np.full(m, grid[1], np.int16), pa.int16()), "heatmap": heatmap,
        "vmin": pa.array(host["vmin"][valid][keep].astype(np.float32), pa.float32()),
        "vmax": pa.array(host["vmax"][valid][keep].astype(np.float32), pa.float32()),
    }, schema=schemas.get("masks").arrow)
    return relevancy, masks
