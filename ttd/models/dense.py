"""Dense (per-patch) image features in the joint image-text space, from any open_clip ViT.

One pass runs every block but the last; the last block is then applied twice from the same input: as trained (for
the global image embedding) and as a training-free *dense head* (for the patches). Heads, on the last block's
input x (tokens incl. class token), with y = ln_1(x) and q, k, v from its attention's in-projection:

- ``maskclip``:  out_proj(v); no residual, no FFN                        (MaskCLIP's value path)
- ``sclip``:     x + out_proj((softmax(qq^T) + softmax(kk^T)) v), then + FFN  (correlative self-attention)
- ``clearclip``: out_proj(softmax(qq^T) v); no residual, no FFN
- ``naclip``:    out_proj(softmax(kk^T + G) v); no residual, no FFN; G a Gaussian window over the patch grid

followed by ln_post and proj. Residual/FFN placement for SCLIP and the Gaussian's form for NACLIP follow our
reading of those papers; docs/METHOD.md lists them as our choices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ttd.configs import HEADS

NACLIP_STD = 5.0  # patches


def check_head(head: str) -> str:
    from ttd.errors import TTDError

    if head not in HEADS:
        raise TTDError(f"unknown dense head {head!r}: use one of {', '.join(HEADS)}")
    return head


def embed_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch + class tokens with positional embeddings resized to the input's grid (any image size)."""
    x = visual.conv1(images)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    n = pos.shape[0] - 1
    side = int(math.isqrt(n))
    if (gh, gw) != (side, side):
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)
    x = x + pos
    return visual.ln_pre(x), (gh, gw)


def _qkv(block, y: torch.Tensor):
    attn = block.attn
    b, t, w = y.shape
    h = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda z: z.reshape(b, t, h, w // h).transpose(1, 2)  # noqa: E731  [b, heads, t, d]
    return split(q), split(k), split(v), w // h


def _merge(block, z: torch.Tensor) -> torch.Tensor:
    b, h, t, d = z.shape
    return block.attn.out_proj(z.transpose(1, 2).reshape(b, t, h * d))


def gaussian_window(grid: tuple[int, int], std: float, device, dtype) -> torch.Tensor:
    """[T, T] additive attention bias: exp(-d^2 / 2 std^2) between patches; zero for the class token."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pts = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(dtype)
    d2 = torch.cdist(pts, pts).pow(2)
    window = torch.exp(-d2 / (2 * std * std))
    out = torch.zeros(gh * gw + 1, gh * gw + 1, device=device, dtype=dtype)
    out[1:, 1:] = window
    return out


def dense_block(block, x: torch.Tensor, head: str, grid: tuple[int, int]) -> torch.Tensor:
    """The last block's output tokens under a dense head (see module docstring)."""
    y = block.ln_1(x)
    if head == "maskclip":  # the value path only: the query and key projections would be thrown away
        return block.attn.out_proj(F.linear(y, *_v_proj(block)))
    q, k, v, d = _qkv(block, y)
    scale = d ** -0.5
    if head == "clearclip":
        return _merge(block, torch.softmax(q @ q.transpose(-1, -2) * scale, -1) @ v)
    if head == "naclip":
        bias = gaussian_window(grid, NACLIP_STD, x.device, x.dtype)
        return _merge(block, torch.softmax(k @ k.transpose(-1, -2) * scale + bias, -1) @ v)
    if head == "sclip":
        attn = torch.softmax(q @ q.transpose(-1, -2) * scale, -1) + torch.softmax(k @ k.transpose(-1, -2) * scale, -1)
        x = x + block.ls_1(_merge(block, attn @ v))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    raise ValueError(head)


def _v_proj(block) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = block.attn.in_proj_weight
    width = w.shape[1]
    bias = block.attn.in_proj_bias
    return w[2 * width:], (bias[2 * width:] if bias is not None else None)


def encode_image_dense(model, images: torch.Tensor, head: str = "maskclip") -> tuple[torch.Tensor, torch.Tensor]:
    """Global image embeddings [B, D] and dense patch embeddings [B, gh, gw, D], both un-normalised."""
    visual = model.visual
    x, grid = embed_tokens(visual, images)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    pooled, _ = visual._pool(last(x))
    global_emb = pooled @ visual.proj
    tokens = dense_block(last, x, head, grid)[:, 1:]
    dense = visual.ln_post(tokens) @ visual.proj
    return global_emb, dense.reshape(images.shape[0], grid[0], grid[1], -1)
