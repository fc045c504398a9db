"""TTD step 1: score each candidate tag against the image and select the image-relevant ones.

Three raw scores per (sample, tag), all cosines in the joint space:
- pixel-tag: the tag's heatmap (cosine with every patch embedding of a dense head) at its best pixel (TTD);
- image-tag: the global image embedding against the tag (biased baseline);
- text-tag:  the caption embedding against the tag (biased baseline).
Each is normalised across the caption's candidates, and the configured one is thresholded: pixel-tag by min-max
(default), the two baselines as the paper shows them, a softmax over the caption's tags at CLIP's temperature
(logit scale 100), which peaks on one tag.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ttd.configs import ScoreConfig
from ttd.models.dense import encode_image_dense
from ttd.stages.score_batch import Normalisations, on_device


def trimmable(model) -> bool:
    """open_clip's CLIP text tower with a causal mask and EOT pooling: padding after the EOT cannot change it."""
    return (getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", "") == "argmax"
            and hasattr(model, "token_embedding"))


def encode_trimmed(model, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """`model.encode_text` on tokens cut after the batch's longest prompt (`length`, counted on the host before
    the copy, so the device is never waited for). Under the causal mask every position up to the EOT sees only
    earlier positions, so the pooled output is the same; the text tower then runs on ~10 tokens instead of the
    context length (77 for CLIP)."""
    if length is None:
        length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :max(length, 1)]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:tokens.shape[1]].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:tokens.shape[1], :tokens.shape[1]])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


@torch.no_grad()
def encode_texts(bundle, texts: list[str], batch_size: int = 256, trim: bool = True) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] on the model's device, in the order given. Prompts are batched by token
    length."""
    if not texts:
        return torch.zeros(0, bundle.embed_dim, device=bundle.device)
    tokens = bundle.tokenizer(texts)
    fast = trim and trimmable(bundle.model)
    order = torch.argsort((tokens != 0).sum(dim=1)) if fast else torch.arange(len(texts))
    out = torch.empty(len(texts), bundle.embed_dim, device=bundle.device)
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        batch = tokens[idx]
        length = int((batch != 0).sum(dim=1).max())
        batch = batch.to(bundle.device, non_blocking=True)
        emb = encode_trimmed(bundle.model, batch, length) if fast else bundle.model.encode_text(batch)
        out[idx.to(bundle.device)] = F.normalize(emb.float(), dim=-1)
    return out


@torch.no_grad()
def encode_tags(bundle, tags: list[str], templates: tuple[str, ...], trim: bool = True) -> torch.Tensor:
    """Prompt-ensembled tag embeddings [N, D] on the model's device: mean of the normalised template embeddings,
    renormalised."""
    if not tags:
        return torch.zeros(0, bundle.embed_dim, device=bundle.device)
    prompts = [t.format(tag) for tag in tags for t in templates]
    emb = encode_texts(bundle, prompts, trim=trim).reshape(len(tags), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def dense_features(model, images: torch.Tensor, head: str, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_image_dense`; with `flip`, averaged with the horizontally mirrored images' (their patch grid mirrored
    back), one forward for both."""
    if not flip:
        return encode_image_dense(model, images, head)
    n = images.shape[0]
    global_emb, dense = encode_image_dense(model, torch.cat([images, images.flip(-1)]), head)
    return (global_emb[:n] + global_emb[n:]) / 2, (dense[:n] + dense[n:].flip(2)) / 2


def tag_heatmaps(dense: torch.Tensor, tag_emb: torch.Tensor) -> torch.Tensor:
    """Cosine heatmaps [T, gh, gw] of one image's dense features [gh, gw, D] against tags [T, D]."""
    return torch.einsum("hwd,td->thw", F.normalize(dense.float(), dim=-1), tag_emb.float())


def raw_scores(global_emb: torch.Tensor, dense: torch.Tensor, caption_emb: torch.Tensor, tag_emb: torch.Tensor):
    """For one sample: (pixel, image, text) raw scores [T] and the heatmaps [T, gh, gw], on the device of `dense`
    (the model's); a tensor on another device is refused here, not deep inside a kernel."""
    on_device(dense.device, global_emb=global_emb, caption_emb=caption_emb, tag_emb=tag_emb)
    maps = tag_heatmaps(dense, tag_emb)
    pixel = maps.flatten(1).amax(dim=1) if maps.numel() else torch.zeros(0, device=dense.device)
    image = tag_emb @ F.normalize(global_emb.float(), dim=-1)
    text = tag_emb @ caption_emb.float()
    return pixel, image, text, maps


def model_logit_scale(model) -> float:
    """CLIP's inverse temperature, exp(logit_scale) (100 for OpenAI's CLIP); 100 for a model without one."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 100.0


def normalisations(config: ScoreConfig, model) -> Normalisations:
    """How each raw score is normalised across a caption's candidates, by score name."""
    scale = config.logit_scale or model_logit_scale(model)
    return {"pixel": (config.normalisation, scale), "image": (config.baseline_normalisation, scale),
            "text": (config.baseline_normalisation, scale)}


def normalise(scores: np.ndarray, method: str, scale: float = 100.0) -> np.ndarray:
    """Across one caption's candidates. Min-max maps the best tag to 1 and the worst to 0; a single candidate,
    or all equal, maps to 1 (nothing to compare it with: the threshold alone cannot reject it). Softmax is the
    distribution over the tags of softmax(scale x score): one candidate gets 1."""
    scores = np.asarray(scores, dtype=np.float32)
    if method == "none" or scores.size == 0:
        return scores
    if method == "softmax":
        z = np.exp(scale * (scores.astype(np.float64) - scores.max()))
        return (z / z.sum()).astype(np.float32)
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-8:
        return np.ones_like(scores)
    return (scores - lo) / (hi - lo)
