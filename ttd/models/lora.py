"""LoRA on open_clip's ViT and text transformer, as weight parametrizations.

A low-rank update W + (alpha / r) * B @ A is registered on a weight with `torch.nn.utils.parametrize`, so *every*
reader of the weight sees the adapted value: `nn.MultiheadAttention`'s own forward, and our dense heads, which read
`attn.in_proj_weight` directly (ttd.models.dense). peft wraps `nn.MultiheadAttention` in a module of its own and
leaves `in_proj_weight` as the base weight, so its update would be invisible to the dense heads that TTD trains;
that is why this is not peft. B starts at zero: an adapted model starts exactly equal to its base.

Targets (per block): `attn_in` (the fused q/k/v in-projection), `attn_out`, `mlp_fc`, `mlp_proj`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ttd.configs import LORA_TARGETS
from ttd.configs import LORA_TOWERS as TOWERS

# where each of the configs' LoRA targets sits in an open_clip residual block: (module path, weight)
TARGETS = dict(zip(LORA_TARGETS, (("attn", "in_proj_weight"), ("attn.out_proj", "weight"), ("mlp.c_fc", "weight"),
                                  ("mlp.c_proj", "weight")), strict=True))


class LowRankDelta(nn.Module):
    """The parametrization: weight -> weight + scale * B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, seed_gen: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        a = torch.empty(rank, in_features)
        bound = 1 / math.sqrt(in_features)  # kaiming-uniform-like, as in the LoRA paper's reference
        a.uniform_(-bound, bound, generator=seed_gen)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def _blocks(model, tower: str) -> list[nn.Module]:
    if tower == "visual":
        return list(model.visual.transformer.resblocks)
    if tower == "text":
        return list(model.transformer.resblocks)
    raise ValueError(f"unknown tower {tower!r}: use {', '.join(TOWERS)}")


def lora_sites(model, towers: Iterable[str], targets: Iterable[str], last_blocks: int | None = None):
    """(name, module, weight attribute) of every weight LoRA adapts, in a stable order."""
    out = []
    for tower in towers:
        blocks = _blocks(model, tower)
        first = 0 if not last_blocks else max(0, len(blocks) - last_blocks)
        for i in range(first, len(blocks)):
            for target in targets:
                if target not in TARGETS:
                    raise ValueError(f"unknown LoRA target {target!r}: use {', '.join(TARGETS)}")
                path, attr = TARGETS[target]
                module = blocks[i].get_submodule(path)
                out.append((f"{tower}.{i}.{target}", module, attr))
    return out


def add_lora(model, *, rank: int, alpha: float, towers: Iterable[str], targets: Iterable[str],
             last_blocks: int | None = None, seed: int = 0,
             tower_ranks: dict[str, int] | None = None) -> dict[str, LowRankDelta]:
    """Freeze the model and register LoRA on the chosen weights; returns the deltas by site name.

    `tower_ranks` gives a tower its own rank; its alpha scales with it, so every tower keeps alpha / rank."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module, attr in lora_sites(model, towers, targets, last_blocks):
        weight = getattr(module, attr)
        r = (tower_ranks or {}).get(name.split(".", 1)[0], rank)
        delta = LowRankDelta(weight.shape[0], weight.shape[1], r, alpha * r / rank, gen).to(weight.device)
        parametrize.register_parametrization(module, attr, delta)
        deltas[name] = delta
    return deltas


def lora_state(deltas: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": getattr(d, p).detach().cpu().contiguous() for name, d in deltas.items()
            for p in ("lora_A", "lora_B")}


def load_lora_state(deltas: dict[str, LowRankDelta], state: dict[str, torch.Tensor]) -> None:
    want = set(lora_state(deltas))
    if set(state) != want:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise ValueError(f"LoRA weights do not fit: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for name, d in deltas.items():
            d.lora_A.copy_(state[f"{name}.lora_A"])
            d.lora_B.copy_(state[f"{name}.lora_B"])


def merge_lora(model) -> None:
    """Fold every LoRA update into its weight and drop the parametrizations (inference at base-model speed)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
