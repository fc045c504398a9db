"""Heatmaps as stored in the `masks` table: uint8 bytes with the value range they span. numpy only, so readers
(`ttd show`, the report) need not import torch."""

from __future__ import annotations

import numpy as np


def quantise(heatmap: np.ndarray) -> tuple[bytes, float, float]:
    """uint8 row-major bytes with the value range they span: 1 byte per patch (a 14x14 ViT-B-16 map is 196 B)."""
    hm = np.asarray(heatmap, dtype=np.float32)
    lo, hi = float(hm.min()), float(hm.max())
    q = np.zeros(hm.shape, np.uint8) if hi - lo < 1e-12 else np.round((hm - lo) / (hi - lo) * 255).astype(np.uint8)
    return q.tobytes(), lo, hi


def dequantise(data: bytes, height: int, width: int, vmin: float, vmax: float) -> np.ndarray:
    q = np.frombuffer(data, dtype=np.uint8).reshape(height, width).astype(np.float32)
    return vmin + q / 255.0 * (vmax - vmin)
