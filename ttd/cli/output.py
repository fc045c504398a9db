"""What every command prints: progress bars and messages on stderr, results on stdout (`--json`: one document)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)
out = Console()


def progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err, disable=not enabled, transient=False)


class ShardProgress:
    """A per-shard stage's bar: shards done of the shards to do (the total set when the stage has planned), the
    rate in the user's unit (images, captions, samples), measured from when work starts, so loading a model or a
    parser is not counted; the ETA follows from the shards' pace."""

    def __init__(self, bar: Progress, name: str, unit: str):
        self.bar, self.unit, self.items = bar, unit, 0
        self.task = bar.add_task(f"{name} (shards)", total=None, rate="")

    def start(self, shards: int) -> None:
        self.items = 0
        self.bar.reset(self.task, total=shards, rate="")

    def shard(self, items: int) -> None:
        self.items += items
        elapsed = self.bar.tasks[self.task].elapsed or 1e-9
        self.bar.update(self.task, advance=1, rate=f"{self.items / elapsed:,.1f} {self.unit}/s")


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def emit(summary: dict, as_json: bool, line: str) -> None:
    """A command's result: the summary as JSON on stdout with --json, else one line for a person on stderr."""
    if as_json:
        emit_json(summary)
    else:
        err.print(line)
