"""`ttd run`: the Prefect flow from the command line. Every RUN.yaml setting is also a flag (`--score-threshold 0.6`).

The flags are built from `ttd.pipeline.runconfig.RunConfig` only when `ttd run` itself is parsed (RunCommand), so other
commands never pay for importing the stage configs (torch, open_clip) at start-up.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
import yaml
from typer.core import TyperCommand

from ttd.errors import TTDError

_SETTINGS = "ttd_run_settings"


def _settings_command() -> click.Command:
    """A throw-away Typer command whose options are RunConfig's settings, so Typer builds (and --help shows) them
    like any hand-written option; RunCommand borrows its params."""
    from ttd.pipeline.runconfig import flag_specs

    params, annotations = [], {}
    for spec in flag_specs():
        panel = f"Settings: {spec.path[0]}" if len(spec.path) > 1 else "Settings"
        if spec.kind == "bool":
            kind: Any = bool
            option = typer.Option(f"--{spec.flag}/--no-{spec.flag}", help=spec.help, rich_help_panel=panel,
                                  show_default=False)
        else:
            kind = {"int": int, "float": float}.get(spec.kind, str)
            help_text = spec.help + (f" One of: {', '.join(spec.choices)}." if spec.choices else "")
            option = typer.Option(f"--{spec.flag}", help=help_text, rich_help_panel=panel, show_default=False,
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
    return typer.main.get_command(sub)


class RunCommand(TyperCommand):
    """Adds the setting flags when `ttd run` is parsed (including for --help), not when the CLI starts, and hands
    their values to the command through ctx.meta as {path: value}."""

    _settings: dict[str, tuple[tuple[str, ...], str, str]] | None = None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self._settings is None:
            from ttd.pipeline.runconfig import flag_specs

            self._settings = {spec.dest: (spec.path, spec.kind, spec.flag) for spec in flag_specs()}
            self.params.extend(_settings_command().params)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        values: dict[tuple[str, ...], Any] = {}
        for dest, (path, kind, flag) in (self._settings or {}).items():
            value = ctx.params.pop(dest, None)
            if value is not None and kind == "yaml":
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as exc:
                    raise TTDError(f"--{flag}: not a YAML value: "
                                   f"{str(exc).splitlines()[0]}") from None
            values[path] = value
        ctx.meta[_SETTINGS] = values
        return super().invoke(ctx)


def _stage_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, r in summary["stages"].items():
        if "batches" in r:
            work = f"{r['batches']} batch(es), {r['cached_batches']} cached; {r['shards_processed']} shard(s) " \
                   f"processed, {r['shards_already_done']} already done"
            if r.get("waiting"):
                work += f", {len(r['waiting'])} waiting"
        else:
            work = r.get("state", "")
        rows.append((name, r["status"], work, f"{r['seconds']:.1f}"))
    return rows


def run_flow(cfg, err) -> dict[str, Any]:
    """Run the flow for this RunConfig; returns its summary, or raises typer.Exit / TTDError with one line."""
    # NOTES: the temporary server's 20 s start-up limit fails under load
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # the temporary server's telemetry write races its own start-up on SQLite ("database is locked" tracebacks)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        from flows.pipeline import run_pipeline
    except ImportError as exc:
        raise TTDError(f"cannot import the Prefect flow (flows/pipeline.py): {exc}; install the project from its "
                       "repository (pip install -e .) or run from the repository root") from None
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    err.print(f"ttd run {cfg.name!r}: stages {', '.join(cfg.stages())}; Prefect "
              + (f"server {api}" if api else "temporary local server (set PREFECT_API_URL to use a Prefect server)"))
    state = run_pipeline(cfg, return_state=True)
    if not state.is_completed():
        from ttd.pipeline.units import StageFailed

        exc = state.result(raise_on_failure=False)
        if isinstance(exc, StageFailed):
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if exc.user_error else 1)
        if isinstance(exc, TTDError):
            raise exc
        err.print(f"[bold red]error:[/] flow run {state.name}: {exc!r}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    summary = state.result()
    return summary


def run_command(ctx: typer.Context, config: Path | None, as_json: bool, print_config: bool, err, out,
                emit_json) -> None:
    from ttd.pipeline.runconfig import load_run_config, overrides_from_flags

    cfg = load_run_config(config, overrides_from_flags(ctx.meta.get(_SETTINGS, {})))
    if print_config:
        out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", markup=False,
                  highlight=False)
        return
    summary = run_flow(cfg, err)
    if as_json:
        emit_json(summary)
        return
    from rich.table import Table

    table = Table("stage", "status", "work", "seconds", title=f"ttd run {summary['flow_run_name']}")
    for row in _stage_rows(summary):
        table.add_row(*row)
    out.print(table)
    for name in ("evaluate", "evaluate_distilled"):
        result = summary["stages"].get(name, {}).get("result") or {}
        if result.get("metrics"):
            from ttd.eval.tagmask import table_text

            out.print(f"{name}: {result.get('model_id')}", highlight=False)
            out.print(table_text(result["metrics"]), highlight=False)
    note = " (every stage was already done)" if summary["all_done_before"] else ""
    err.print(f"finished in {summary['seconds']:.1f} s{note}; store {summary['store']}")
