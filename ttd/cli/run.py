"""`ttd run`: the Prefect flow from the command line. Every RUN.yaml setting is also a flag (`--score-threshold 0.6`).

The flags are built from `ttd.pipeline.runconfig.RunConfig` when `ttd run` itself is parsed (`ttd.cli.options`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
import yaml

from ttd.cli.options import overrides, settings_command
from ttd.cli.output import emit_json, err, out
from ttd.errors import TTDError

# `--model` and `--pretrained` are kept short, as in every other command; a caption style is one YAML value
RunCommand = settings_command("ttd.pipeline.runconfig:RunConfig",
                              short={("model", "name"): "model", ("model", "pretrained"): "pretrained"},
                              whole=("ttd.synth.captions:CaptionStyle",))
run_flags = RunCommand.flag_specs  # every RUN.yaml setting as `ttd run` spells its flag


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


def run_flow(cfg) -> dict[str, Any]:
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


def run_command(ctx: typer.Context, config: Path | None, as_json: bool, print_config: bool) -> None:
    from ttd.pipeline.runconfig import load_run_config

    cfg = load_run_config(config, overrides(ctx))
    if print_config:
        out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", markup=False,
                  highlight=False)
        return
    summary = run_flow(cfg)
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
