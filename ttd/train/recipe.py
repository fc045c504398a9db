"""The training recipe pre-training and distillation share: CLIP's AdamW, its parameter groups, the learning-rate
schedule, and open_clip's preprocessing split into a once-per-image part and a per-batch normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torchvision.transforms as T

from ttd.errors import TTDError


class Schedule(Protocol):
    """What `lr_at` reads of a config (PretrainConfig and DistillConfig both have it)."""

    lr: float
    warmup_steps: int
    steps: int


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """CLIP's optimiser settings (betas 0.9 / 0.98, eps 1e-6)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on gains, biases, embeddings and the temperature (the usual CLIP recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: Schedule) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def geometry_and_norm(preprocess) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """Split open_clip's preprocessing into the geometric part (run once) and Normalize (run per batch)."""
    geo, mean, std = [], None, None
    for t in preprocess.transforms:
        if isinstance(t, T.Normalize):
            mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
        elif isinstance(t, (T.Resize, T.CenterCrop)):
            geo.append(t)
    if mean is None:
        raise TTDError("model preprocessing has no Normalize step; cannot pre-train it")
    return T.Compose(geo), mean, std
