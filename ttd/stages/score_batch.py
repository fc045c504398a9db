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
import pyarrow.compute  # noqa: F401 - pa.compute
import torch
import torch.nn.functional as F

from ttd.store import schemas

SCORES = ("pixel", "image", "text")
Normalisations = dict[str, tuple[str, float]]  # score name -> (method, softmax inverse temperature)


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
        counts = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        return cls.from_flat(np.fromiter((i for r in rows for i in r), np.int64, int(counts.sum())), counts)

    @classmethod
    def from_flat(cls, flat: np.ndarray, counts: np.ndarray) -> Candidates:
        """Sample b's candidates are the next counts[b] entries of `flat` (tag-matrix rows), in order."""
        valid = np.arange(max(int(counts.max(initial=0)), 1)) < counts[:, None]
        index = np.zeros(valid.shape, np.int64)
        index[valid] = flat
        return cls(torch.from_numpy(index), torch.from_numpy(valid))

    def to(self, device: torch.device) -> Candidates:
        return Candidates(self.index.to(device, non_blocking=True), self.valid.to(device, non_blocking=True))


class ShardCandidates:
    """A shard's candidate tags (the `tags` rows of its samples, each sample's in order) and where each sample's
    run of rows starts: a batch's candidates are then gathered with array operations, not per-row Python."""

    def __init__(self, tags: pa.Table):
        order = pa.compute.sort_indices(tags, [("key", "ascending")])  # stable: a sample keeps its tags' order
        self.table = tags.take(order)
        keys = self.table.column("key").to_numpy(zero_copy_only=False)
        unique, starts, counts = np.unique(keys, return_index=True, return_counts=True) if len(keys) else ([], [], [])
        self.spans = {k: (int(s), int(c)) for k, s, c in zip(unique, starts, counts)}

    def __contains__(self, key: str) -> bool:
        return key in self.spans

    def vocabulary(self) -> list[str]:
        return sorted(set(self.table.column("lower").to_pylist()))

    def rows(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row indices into `table` of these samples' candidates, in order; candidates per sample)."""
        spans = np.array([self.spans[k] for k in keys], np.int64).reshape(-1, 2)
        starts, counts = spans[:, 0], spans[:, 1]
        ends = np.cumsum(counts)
        idx = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - counts), counts)
        return idx, counts


def normalise_rows(x: torch.Tensor, valid: torch.Tensor, method: str, scale: float = 100.0) -> torch.Tensor:
    """Across each caption's candidates (padding ignored), as `relevancy.normalise` does for one caption: min-max
    (all equal maps to 1), or softmax(scale x) (padding gets 0)."""
    if method == "none":
        return x
    if method == "softmax":
        probs = torch.where(valid, x * scale, -torch.inf).softmax(dim=1)
        return torch.where(valid, probs, torch.zeros_like(probs))  # a row without candidates: 0, not NaN
    big = torch.finfo(x.dtype).max
    lo = torch.where(valid, x, big).amin(dim=1, keepdim=True)
    hi = torch.where(valid, x, -big).amax(dim=1, keepdim=True)
    span = hi - lo
    return torch.where(span < 1e-8, torch.ones_like(x), (x - lo) / span.clamp_min(1e-8))


@torch.no_grad()
def compute(global_emb: torch.Tensor, dense: torch.Tensor, caption_emb: torch.Tensor, tag_matrix: torch.Tensor,
            cands: Candidates, *, normalisation: Normalisations, selection: str, threshold: float
            ) -> dict[str, torch.Tensor]:
    """Raw and normalised pixel/image/text scores [B, T], the selection [B, T], and each heatmap quantised to uint8
    [B, T, gh, gw] with its value range [B, T]; all on the model's device (that of `dense`)."""
    maps, raw = heatmaps(global_emb, dense, caption_emb, tag_matrix, cands)
    return finish(maps, raw, cands.valid, normalisation=normalisation, selection=selection, threshold=threshold)


def heatmaps(global_emb: torch.Tensor, dense: torch.Tensor, caption_emb: torch.Tensor, tag_matrix: torch.Tensor,
             cands: Candidates) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every candidate's cosine heatmap [B, T, gh, gw] and its raw pixel/image/text scores [B, T]."""
    device = dense.device
    on_device(device, global_emb=global_emb, caption_emb=caption_emb, tag_matrix=tag_matrix,
              candidate_index=cands.index, candidate_valid=cands.valid)
    b, gh, gw, d = dense.shape
    tags = tag_matrix.float()[cands.index]  # [B, T, D]: one gather
    patches = dense.float().reshape(b, gh * gw, d)
    # cosine = (tag . patch) / |patch| (tags are unit vectors): one batched matmul, then a [B, HW] scale, instead of
    # writing a normalised copy of every patch embedding first
    inv_norm = 1.0 / patches.norm(dim=2).clamp_min(1e-12)
    maps = torch.bmm(tags, patches.transpose(1, 2)) * inv_norm.unsqueeze(1)  # [B, T, HW]
    raw = {"pixel": maps.amax(dim=2),
           "image": torch.einsum("btd,bd->bt", tags, F.normalize(global_emb.float(), dim=-1)),
           "text": torch.einsum("btd,bd->bt", tags, caption_emb.float())}
    return maps.reshape(b, -1, gh, gw), raw


def finish(maps: torch.Tensor, raw: dict[str, torch.Tensor], valid: torch.Tensor, *, normalisation: Normalisations,
           selection: str, threshold: float) -> dict[str, torch.Tensor]:
    """From heatmaps [B, T, gh, gw] and raw scores: per-caption normalisation (`relevancy.normalisations`: method
    and softmax scale by score name), selection, uint8 quantisation."""
    b, t, gh, gw = maps.shape
    flat = maps.reshape(b, t, gh * gw)
    out = {f"{k}_raw": v for k, v in raw.items()}
    out.update({f"{k}_score": normalise_rows(v, valid, *normalisation[k]) for k, v in raw.items()})
    out["selected"] = (out[f"{selection}_score"] >= threshold) & valid
    lo, hi = flat.amin(dim=2), flat.amax(dim=2)
    span = (hi - lo).unsqueeze(2)
    scaled = torch.round((flat - lo.unsqueeze(2)) / span.clamp_min(1e-30) * 255)
    out["heatmap"] = torch.where(span < 1e-12, torch.zeros_like(scaled), scaled).to(torch.uint8).reshape(
        b, t, gh, gw)
    out["vmin"], out["vmax"] = lo, hi
    out["valid"] = valid
    return out


def to_host(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The batch's results on the host: every copy queued without blocking, then one wait."""
    host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
    if any(v.is_cuda for v in out.values()):
        torch.cuda.current_stream().synchronize()
    return {k: v.numpy() for k, v in host.items()}


def batch_tables(host: dict[str, np.ndarray], keys: list[str], counts: np.ndarray, candidates: pa.Table, *,
                 threshold: float, model_id: str, head: str, masks_for: str) -> tuple[pa.Table, pa.Table]:
    """`relevancy` and `masks` rows of one batch, columns built from the host arrays (no per-row Python).
    `candidates`: the batch's candidate rows in order (`tag_index`, `text`), counts[b] of them for keys[b]."""
    valid = host["valid"]
    grid = host["heatmap"].shape[2:4]
    n = int(valid.sum())
    key_col = pa.array(keys, pa.string()).take(pa.array(np.repeat(np.arange(len(keys)), counts)))
    rel = {"key": key_col, "tag_index": candidates.column("tag_index").cast(pa.int32()),
           "text": candidates.column("text").cast(pa.string())}
    for name in SCORES:
        rel[f"{name}_raw"] = pa.array(host[f"{name}_raw"][valid].astype(np.float32), pa.float32())
        rel[f"{name}_score"] = pa.array(host[f"{name}_score"][valid].astype(np.float32), pa.float32())
    selected = host["selected"][valid]
    rel["selected"] = pa.array(selected, pa.bool_())
    rel["threshold"] = pa.array(np.full(n, threshold, np.float32), pa.float32())
    rel["model_id"] = pa.repeat(pa.scalar(model_id, pa.string()), n)
    rel["head"] = pa.repeat(pa.scalar(head, pa.string()), n)
    relevancy = pa.Table.from_pydict(rel, schema=schemas.get("relevancy").arrow)

    keep = selected if masks_for == "selected" else np.ones(n, bool)
    m = int(keep.sum())
    cells = grid[0] * grid[1]
    data = np.ascontiguousarray(host["heatmap"][valid][keep]).reshape(-1)
    offsets = np.arange(0, (m + 1) * cells, cells, dtype=np.int32)
    heatmap = pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    kept = pa.array(keep)
    masks = pa.Table.from_pydict({
        "key": key_col.filter(kept), "tag_index": rel["tag_index"].filter(kept), "text": rel["text"].filter(kept),
        "height": pa.array(np.full(m, grid[0], np.int16), pa.int16()),
        "width": pa.array(np.full(m, grid[1], np.int16), pa.int16()), "heatmap": heatmap,
        "vmin": pa.array(host["vmin"][valid][keep].astype(np.float32), pa.float32()),
        "vmax": pa.array(host["vmax"][valid][keep].astype(np.float32), pa.float32()),
    }, schema=schemas.get("masks").arrow)
    return relevancy, masks
