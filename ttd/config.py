"""Stage configs are pydantic models loaded from YAML and overridden from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from .errors import TTDError

M = TypeVar("M", bound=pydantic.BaseModel)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate `data`; unknown keys and bad values become one line naming the field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise TTDError(f"{source}: {problems}") from None


def load_yaml(model: type[M], path: str | Path | None, overrides: dict[str, Any] | None = None,
              defaults: dict[str, Any] | None = None) -> M:
    """`defaults` (e.g. a preset) < the YAML file < `overrides` (command-line flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TTDError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TTDError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise TTDError(f"config file {str(p)!r} must hold a mapping of settings, not {type(data).__name__}")
    return build(model, _merge(_merge(defaults or {}, data), overrides or {}), str(path or "options"))
