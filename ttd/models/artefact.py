"""The model artefacts ttd writes and reads, in one place: their layout, their manifests, saving and loading.

- A whole model (`ttd pretrain`, `ttd distill --no-lora`): a folder with `model.safetensors` and `model.json`
  (`{"model": NAME, "model_cfg": {...}, "kind": ..., ...}`), so `--pretrained DIR` needs no `--model`.
- A LoRA (`ttd distill`): `lora.safetensors` and `lora.json` (`{"kind": "lora", "lora": spec, "base": ...}`), loaded
  with `--lora DIR` on the base model its manifest names.

Each is committed by writing its manifest last, atomically; a run's `fingerprint` in the manifest says which inputs
and settings made it. Weights are only ever read from safetensors, or from a torch file with `weights_only=True`:
nothing is unpickled. A model's identity (`ttd.models.loading.model_identity`) is read from these files without
building the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch

from ttd import __version__
from ttd.errors import TTDError

ARTEFACT_CONFIG = "model.json"
ARTEFACT_WEIGHTS = "model.safetensors"
LORA_CONFIG = "lora.json"
LORA_WEIGHTS = "lora.safetensors"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch file loaded with weights_only=True (a pickle with code is refused)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise TTDError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TTDError(f"refused to load {path}: not a plain tensor checkpoint ({type(exc).__name__}); ttd only "
                       "loads safetensors or weights-only torch files") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TTDError(f"{path} does not hold a state dict")
    return state


def read_artefact_config(path: Path) -> dict:
    try:
        return json.loads((path / ARTEFACT_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise TTDError(f"{path} is not a ttd model artefact ({ARTEFACT_CONFIG} unreadable: {exc})") from None




def read_lora_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        doc = json.loads((p / LORA_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise TTDError(f"--lora {str(path)!r} is not a ttd LoRA artefact ({LORA_CONFIG} unreadable: {exc}); "
                       "`ttd distill` writes one") from None
    if doc.get("kind") != "lora":
        raise TTDError(f"--lora {str(path)!r}: {LORA_CONFIG} is not a LoRA manifest")
    return doc


def manifest(out: Path) -> dict | None:
    """The manifest of the artefact in `out` (a LoRA's, else a whole model's); None when there is none."""
    for name in (LORA_CONFIG, ARTEFACT_CONFIG):
        try:
            return json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"ttd_version": __version__})
    tmp.replace(path)


def save_model(out: Path, bundle, meta: dict[str, Any], fp16: bool = False) -> None:
    """A whole model: its weights (fp16 when asked), then model.json naming its open_clip config (the commit
    point: a folder without it is no artefact)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
             for k, v in bundle.model.state_dict().items()}
    _save_tensors(out / ARTEFACT_WEIGHTS, state)
    cfg = open_clip.get_model_config(bundle.name)
    _write_json(out / ARTEFACT_CONFIG, {"model": bundle.name, "model_cfg": cfg, **meta})


def save_lora(out: Path, state: dict[str, torch.Tensor], spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """A LoRA: its update's tensors, then lora.json (the commit point) with the placement `spec` and `meta`."""
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / LORA_WEIGHTS, state)
    _write_json(out / LORA_CONFIG, {"kind": "lora", "lora": spec, **meta})
