"""Training checkpoints that survive a kill at any instant: trainable weights and AdamW moments as safetensors,
with the step, the samples consumed, the log so far and the run's fingerprint in `state.json`, written last.

Used by `ttd distill` and `ttd pretrain`: a re-run with the same inputs loads the checkpoint and continues; one
made by another configuration (another fingerprint) is ignored. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ttd.errors import TTDError
from ttd.models.artefact import load_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


def save(folder: Path, step: int, consumed: int, fp: str, trainable: dict[str, torch.nn.Parameter],
         opt: torch.optim.Optimizer, log_rows: list[dict], extra: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
    names = list(trainable)
    index = {id(p): i for i, p in enumerate(trainable.values())}
    for p, st in opt.state.items():
        i = index[id(p)]
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    # A kill can land between any two writes: the tensors go to a new step-stamped file that state.json, written
    # last, names; until then the previous state.json and the file it names are untouched.
    tensor_file = f"state-{step:08d}.safetensors"
    tmp = folder / f"{tensor_file}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / tensor_file)
    doc = {"step": step, "consumed": consumed, "fingerprint": fp, "params": names, "log": log_rows,
           "tensors": tensor_file, "extra": extra or {}}
    tmp_json = folder / "state.json.tmp"
    tmp_json.write_text(json.dumps(doc))
    tmp_json.replace(folder / "state.json")  # the checkpoint's commit point
    for old in folder.glob("state*.safetensors*"):  # earlier steps' files, and leftovers of killed writes
        if old.name != tensor_file:
            old.unlink(missing_ok=True)


def load(folder: Path, fp: str, trainable: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer
         ) -> tuple[int, int, list[dict], dict[str, Any]] | None:
    """(step, consumed, log rows, extra) with the weights and optimiser state restored; None without a
    checkpoint of this fingerprint."""
    try:
        doc = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if doc.get("fingerprint") != fp or doc.get("params") != list(trainable):
        log.warning("checkpoint in %s belongs to another configuration: starting afresh", folder)
        return None
    tensor_file = str(doc.get("tensors", "state.safetensors"))
    if not re.fullmatch(r"state(-\d{8})?\.safetensors", tensor_file):  # a file in this folder, nothing else
        raise TTDError(f"checkpoint {folder}/state.json names {tensor_file!r} as its tensors; delete that folder "
                       "to start afresh")
    try:
        state = load_state_dict(folder / tensor_file)
    except TTDError as exc:
        raise TTDError(f"checkpoint {folder} is unreadable ({exc}); delete that folder to start afresh") from None
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(state[f"param.{n}"])
    params = list(trainable.values())
    for key, v in state.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt.state[params[int(i)]][k] = v.to(params[int(i)].device) if k != "step" else v
    return doc["step"], doc["consumed"], doc["log"], doc.get("extra") or {}


def remove(folder: Path) -> None:
    for path in [folder / "state.json", *folder.glob("state*.safetensors*"), *folder.glob("state.json.tmp")]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
