"""Stage configs are pydantic models loaded from YAML and overridden from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml

from ttd.errors import TTDError

M = TypeVar("M", bound=pydantic.BaseModel)


def _every_template_has_a_slot(templates: tuple[str, ...]) -> tuple[str, ...]:
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every template needs one '{}' slot for the tag or class name")
    return templates


# prompt templates ("a photo of a {}."), as the score, distill and segmentation configs take them
Templates = Annotated[tuple[str, ...], pydantic.AfterValidator(_every_template_has_a_slot)]


def deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`: nested mappings merge key by key (a nested setting changes only that setting); any
    other value, lists included, replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
    data = read_yaml(path) if path is not None else {}
    return build(model, deep_merge(deep_merge(defaults or {}, data), overrides or {}), str(path or "options"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings as a mapping; one clear line if it is missing, invalid or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise TTDError(f"config file {str(p)!r} does not exist (relative paths start at {str(Path.cwd())!r})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TTDError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TTDError(f"config file {str(p)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data
