"""Build open_clip models from a registry name, a local ttd artefact, or the tiny configurations shipped here.

A ttd artefact (written by `ttd pretrain` or `ttd distill`) is a folder holding `model.safetensors` and
`model.json` (`{"model": NAME, "model_cfg": {...}}`), so `--pretrained PATH` needs no `--model`. Weights are only
ever read from safetensors, or from a torch file with `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from ttd.errors import TTDError
from ttd.models.artefact import (
    ARTEFACT_WEIGHTS,
    LORA_WEIGHTS,
    file_digest,
    load_state_dict,
    read_artefact_config,
    read_lora_manifest,
)
from ttd.models.hub import pretrained_source, weights_available

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL = "ttd-tiny"
# The embedded default base model: ttd-tiny pre-trained on TagMask-Synth by `ttd pretrain --preset embedded`
# (model.json says how to reproduce it), fp16 weights, 16 MB. Used when neither a model nor weights are named.
EMBEDDED_MODEL = Path(__file__).parent / "embedded" / "ttd-tiny-tagmask"
_registered = False


def register_shipped_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(str(CONFIG_DIR))
        _registered = True


_artefact_configs: tempfile.TemporaryDirectory | None = None  # for the process's life: open_clip rescans its files


def register_config(name: str, cfg: dict) -> None:
    """An artefact's own architecture under its model name, through open_clip's public `add_model_config` (which
    reads `NAME.json` files from the folders it was given, and reads them all again when another is added)."""
    global _artefact_configs
    if _artefact_configs is None:
        _artefact_configs = tempfile.TemporaryDirectory(prefix="ttd-model-configs-")
    (Path(_artefact_configs.name) / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(_artefact_configs.name)


@dataclass
class ClipBundle:
    """A model with everything needed to use it consistently."""

    model: open_clip.CLIP
    preprocess: Any  # torchvision transform from the model's own preprocessing config
    tokenizer: Any
    name: str
    model_id: str  # name + weights identity: part of every fingerprint
    image_size: int
    patch_size: int
    context_length: int
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def model_role(lora: str | None) -> str:
    """What a model is, for people: the base model, or what `ttd distill` trained (TTD, or the contrastive-only
    control: a fine-tune without the TTD losses), read from the LoRA artefact's config."""
    if not lora:
        return "base model"
    cfg = read_lora_manifest(lora).get("config") or {}
    ttd = (cfg.get("w_distill") or 0) > 0 or (cfg.get("w_tag") or 0) > 0
    return "TTD" if ttd else "contrastive-only fine-tune"


@dataclass
class ModelSource:
    """Where a model's architecture and weights come from, known without building it."""

    name: str
    tag: str | None  # an open_clip pretrained tag (downloaded or cached by open_clip)
    weights: Path | None  # a local weights file
    model_id: str  # NAME@WEIGHTS: what fingerprints and manifests record


def resolve_model(name: str | None = None, pretrained: str | None = None, seed: int = 0) -> ModelSource:
    """Name and weights of a model as `load_model` would build it; reads at most a small config and hashes the
    weights file. An artefact's own architecture is registered with open_clip here."""
    if name is None and pretrained is None and (EMBEDDED_MODEL / ARTEFACT_WEIGHTS).exists():
        pretrained = str(EMBEDDED_MODEL)
    register_shipped_configs()
    model_cfg, weights, tag = None, None, None
    if pretrained and Path(pretrained).is_dir():
        art = read_artefact_config(Path(pretrained))
        name = name or art.get("model")
        model_cfg = art.get("model_cfg")
        weights = Path(pretrained) / ARTEFACT_WEIGHTS
    elif pretrained and Path(pretrained).is_file():
        weights = Path(pretrained)
    elif pretrained and ("/" in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin"))):
        raise TTDError(f"--pretrained {pretrained!r} does not exist: give a ttd artefact folder, a weights file, "
                       "or an open_clip pretrained tag")
    else:
        tag = pretrained
    name = name or DEFAULT_MODEL
    if model_cfg is not None and name not in open_clip.list_models():
        register_config(name, model_cfg)  # an artefact carries its own architecture
    if name not in open_clip.list_models():
        raise TTDError(f"unknown model {name!r}: use an open_clip model name (e.g. ViT-B-16), one of the shipped "
                       f"configs ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}) or --pretrained "
                       "pointing at a ttd artefact")
    if tag:
        pretrained_source(name, tag)  # an unknown tag fails here, before anything is built or fetched
    weights_id = file_digest(weights) if weights else f"pretrained-{tag}" if tag else f"random-seed{seed}"
    return ModelSource(name, tag, weights, f"{name}@{weights_id}")


def model_identity(name: str | None = None, pretrained: str | None = None, *, seed: int = 0,
                   lora: str | None = None) -> str:
    """The model_id `load_model` would give, without building the model or fetching weights: lets a stage plan
    (and find it has nothing to do) before anything heavy is loaded."""
    if not lora:
        return resolve_model(name, pretrained, seed).model_id
    doc = read_lora_manifest(lora)
    base_id = resolve_model(*_lora_base(name, pretrained, doc), seed).model_id
    _check_lora_base(lora, doc, base_id)
    return f"{base_id}+lora-{file_digest(Path(lora) / LORA_WEIGHTS)}"


def load_model(name: str | None = None, pretrained: str | None = None, *, device: str | torch.device = "cpu",
               seed: int = 0, lora: str | None = None) -> ClipBundle:
    """Load a CLIP model.

    - `pretrained` a folder written by ttd (model.json + model.safetensors): its config names the model.
    - `pretrained` a .safetensors / .pt file: weights for `name`.
    - `pretrained` a tag (e.g. `openai`): open_clip's registry (downloads where the network allows).
    - no `pretrained`: `name` with random weights from `seed`; with no `name` either, the embedded base model.
    - `lora` a folder written by `ttd distill` (lora.json + lora.safetensors): its update is merged into the base
      model, which its manifest names when `name` and `pretrained` are not given; the base's identity must match.
    """
    if lora:
        return _load_with_lora(name, pretrained, device, seed, lora)
    src = resolve_model(name, pretrained, seed)
    name, pretrained = src.name, src.tag
    device = torch.device(device)
    state = load_state_dict(src.weights) if src.weights else None
    # a tag's weights: found in the cache or downloadable, checked before the model is built
    download = weights_available(name, pretrained) if pretrained else contextlib.nullcontext()
    torch.manual_seed(seed)  # random weights are reproducible, so their model_id means something
    quiet = _DropRandomInitWarning()  # we load our own weights next, or say so ourselves
    logging.getLogger().addFilter(quiet)
    try:
        with download:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as exc:
        raise TTDError(f"cannot load model {name!r} with pretrained={pretrained!r}: {exc}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TTDError(f"weights do not fit model {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.to(device)
    if src.weights is None and not pretrained:
        log.warning("model %s has random weights (no --pretrained given)", name)
    model.eval()
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise TTDError(f"model {name!r} is not an open_clip ViT: dense heads need a VisionTransformer")
    patch = visual.conv1.kernel_size[0]
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model, preprocess, tokenizer, name, src.model_id, image_size, patch,
                      int(model.context_length), device)


def _lora_base(name: str | None, pretrained: str | None, doc: dict) -> tuple[str | None, str | None]:
    """The base model a LoRA artefact goes on: the one asked for, else the one its manifest names."""
    if name is None and pretrained is None:
        base = doc.get("base", {})
        return base.get("name"), base.get("pretrained")
    return name, pretrained


def _check_lora_base(lora: str, doc: dict, base_id: str) -> None:
    trained_on = doc.get("base", {}).get("model_id")
    if trained_on and base_id != trained_on:
        raise TTDError(f"--lora {lora!r} was trained on base model {trained_on}, not {base_id}: give "
                       "that base with --model/--pretrained, or omit both to use the one its manifest names")


def _load_with_lora(name: str | None, pretrained: str | None, device, seed: int, lora: str) -> ClipBundle:
    from ttd.models.lora import add_lora, load_lora_state, merge_lora

    doc = read_lora_manifest(lora)
    bundle = load_model(*_lora_base(name, pretrained, doc), device=device, seed=seed)
    _check_lora_base(lora, doc, bundle.model_id)
    spec = doc["lora"]
    wpath = Path(lora) / LORA_WEIGHTS
    deltas = add_lora(bundle.model, rank=spec["rank"], alpha=spec["alpha"], towers=spec["towers"],
                      targets=spec["targets"], last_blocks=spec.get("last_blocks"),
                      tower_ranks=spec.get("tower_ranks"))
    try:
        load_lora_state(deltas, load_state_dict(wpath))
    except ValueError as exc:
        raise TTDError(f"--lora {lora!r}: {exc}") from None
    merge_lora(bundle.model)
    for p in bundle.model.parameters():
        p.requires_grad_(True)
    bundle.model.to(bundle.device).eval()
    bundle.model_id = f"{bundle.model_id}+lora-{file_digest(wpath)}"
    return bundle
