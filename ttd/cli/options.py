"""Command-line options derived from the config models: every setting of a stage's config (or of RUN.yaml) is a flag
named by its path, `--batch-size`, `--score-threshold`, `--lora/--no-lora`, with the field's description as help.

A command declared with `cls=settings_command(...)` gets the flags when it is parsed (including for --help), and
reads their values with `overrides(ctx)`: the settings given, as the nested mapping a config is validated from,
laid over the defaults and a `--config` YAML file (`ttd.configs.load_yaml`). The models import lazily, so the CLI
starts without them.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import click
import pydantic
import typer
import yaml
from typer.core import TyperCommand

from ttd.errors import TTDError

_SETTINGS = "ttd_settings"


@dataclass(frozen=True)
class FlagSpec:
    """One leaf setting of a config model as a command-line flag."""

    path: tuple[str, ...]
    flag: str  # without the leading dashes
    kind: str  # "str", "int", "float", "bool" (--x/--no-x) or "yaml" (lists, mappings, unions: parsed as YAML)
    help: str
    choices: tuple[str, ...] | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        return "setting__" + "__".join(self.path)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kind(annotation: Any) -> tuple[str, tuple[str, ...] | None]:
    if annotation in (bool, str, int, float):
        return annotation.__name__, None
    if typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        return "str", tuple(typing.get_args(annotation))
    return "yaml", None


def flag_specs(model: type[pydantic.BaseModel], prefix: tuple[str, ...] = (), *,
               short: dict[tuple[str, ...], str] | None = None,
               whole: tuple[type[pydantic.BaseModel], ...] = ()) -> list[FlagSpec]:
    """Every leaf setting of `model`, depth first, in declaration order. Nested models are sections (their settings
    are `--section-setting`) unless listed in `whole` (one flag, a YAML value); `short` renames a path's flag."""
    specs = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        annotation = _unwrap_optional(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) \
                and not issubclass(annotation, whole):
            specs.extend(flag_specs(annotation, path, short=short, whole=whole))
            continue
        kind, choices = _kind(annotation)
        flag = (short or {}).get(path) or "-".join(path).replace("_", "-")
        help_text = (field.description or "").strip() or f"{model.__name__}.{name}."
        if kind == "yaml":
            help_text = (help_text + " (YAML value)").strip()
        default = None if field.is_required() else field.get_default(call_default_factory=False)
        specs.append(FlagSpec(path, flag, kind, help_text, choices,
                              default if isinstance(default, (bool, int, float, str, tuple)) else None))
    return specs


def overrides_from_flags(values: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("score", "threshold"): 0.6} -> {"score": {"threshold": 0.6}}; values that are None are left out."""
    out: dict[str, Any] = {}
    for path, value in values.items():
        if value is None:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _help(spec: FlagSpec) -> str:
    text = spec.help + (f" One of: {', '.join(spec.choices)}." if spec.choices else "")
    if spec.default is not None:
        shown = ", ".join(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default
        text += f" (default: {'--' + ('' if spec.default else 'no-') + spec.flag if spec.kind == 'bool' else shown})"
    return text


def _params(specs: list[FlagSpec], panel: str) -> list[click.Parameter]:
    """The click options of `specs`, built by Typer from a throw-away command so they look and --help like any
    hand-written option."""
    params, annotations = [], {}
    for spec in specs:
        section = f"{panel}: {spec.path[0]}" if len(spec.path) > 1 else panel
        if spec.kind == "bool":
            kind: Any = bool
            option = typer.Option(f"--{spec.flag}/--no-{spec.flag}", help=_help(spec), rich_help_panel=section,
                                  show_default=False)
        else:
            kind = {"int": int, "float": float}.get(spec.kind, str)
            help_text = _help(spec)
            option = typer.Option(f"--{spec.flag}", help=help_text, rich_help_panel=section, show_default=False,
                                  **({"metavar": "YAML"} if spec.kind == "yaml" else {}))
        annotation = Annotated[Optional[kind], option]  # noqa: UP045 (a runtime annotation object)
        params.append(inspect.Parameter(spec.dest, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=annotation))
        annotations[spec.dest] = annotation

    def settings(**kwargs: Any) -> None:  # pragma: no cover - never invoked
        pass

    settings.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    settings.__annotations__ = annotations
    sub = typer.Typer(add_completion=False)
    sub.command()(settings)
    return typer.main.get_command(sub).params


def settings_command(model: str, *, panel: str = "Settings", short: dict[tuple[str, ...], str] | None = None,
                     whole: tuple[str, ...] = ()) -> type[TyperCommand]:
    """A Typer command class that adds one option per setting of `model` ("module:Name"; `whole`: nested models,
    as "module:Name", set by one YAML flag) when the command is parsed; `overrides(ctx)` returns their values."""

    def load(ref: str) -> Any:
        module, name = ref.split(":")
        return getattr(importlib.import_module(module), name)

    class SettingsCommand(TyperCommand):
        _specs: list[FlagSpec] | None = None

        @staticmethod
        def flag_specs() -> list[FlagSpec]:
            """The settings' flags, as this command spells them."""
            return flag_specs(load(model), short=short, whole=tuple(load(w) for w in whole))

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if self._specs is None:
                self._specs = self.flag_specs()
                self.params.extend(_params(self._specs, panel))
            return super().parse_args(ctx, args)

        def invoke(self, ctx: click.Context) -> Any:
            values: dict[tuple[str, ...], Any] = {}
            for spec in self._specs or []:
                value = ctx.params.pop(spec.dest, None)
                if value is not None and spec.kind == "yaml":
                    try:
                        value = yaml.safe_load(value)
                    except yaml.YAMLError as exc:
                        raise TTDError(f"--{spec.flag}: not a YAML value: {str(exc).splitlines()[0]}") from None
                values[spec.path] = value
            ctx.meta[_SETTINGS] = values
            return super().invoke(ctx)

    return SettingsCommand


def overrides(ctx: click.Context) -> dict[str, Any]:
    """The settings given as flags to a `settings_command`, as a nested mapping."""
    return overrides_from_flags(ctx.meta.get(_SETTINGS, {}))
