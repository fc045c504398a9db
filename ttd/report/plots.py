"""PNG charts for `ttd report`, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (7.5, 4.2)  # inches; 100 dpi -> 750 x 420 px
DPI = 100


def _figure(size: tuple[float, float] = SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _finite(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def grouped_bars(path: str | Path, groups: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
                 title: str, ylabel: str, ylim: tuple[float, float] | None = (0, 100)) -> str:
    """One group of bars per entry of `groups`, one bar per series (a missing value leaves a gap)."""
    fig = _figure()
    ax = fig.subplots()
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [v if _finite(v) else 0.0 for v in values]
        bars = ax.bar(xs, ys, width, label=name, color=_colour(i))
        ax.bar_label(bars, labels=[f"{v:.1f}" if _finite(v) else "" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return str(path)


def loss_curves(path: str | Path, curves: Mapping[str, Mapping[str, Sequence[float | None]]], *,
                title: str = "training loss") -> str:
    """curves: label -> {"step": [...], "loss": [...], optional "loss_distill"/"loss_tag": [...]}.

    Total loss is a solid line per run; the L_distill and L_tag terms, when logged, are dashed and dotted lines in
    the same colour."""
    fig = _figure()
    ax = fig.subplots()
    styles = (("loss", "-", ""), ("loss_distill", "--", " L_distill"), ("loss_tag", ":", " L_tag"))
    for i, (label, c) in enumerate(curves.items()):
        for column, style, suffix in styles:
            pts = [(s, v) for s, v in zip(c["step"], c.get(column) or []) if _finite(v)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=_colour(i), label=label + suffix,
                        linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return str(path)


def histogram(path: str | Path, edges: Sequence[float], counts: Mapping[str, Sequence[int]], *, title: str,
              xlabel: str, ylabel: str) -> str:
    """Counts already binned (by the query that read them) as side-by-side steps, one colour per series."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(counts.items()):
        ax.stairs(values, edges, label=f"{label} ({sum(values):,})", color=_colour(i), linewidth=1.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    fig.savefig(path)
    return str(path)
