"""The comparison report's PNG plots, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: figures are ``matplotlib.figure.Figure`` objects saved straight to PNG, so importing
this module neither needs a display nor changes the backend of a notebook or script that uses it.
Each run keeps one colour (its index in the matplotlib cycle) across all plots.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Sequence

from matplotlib.figure import Figure

from kda_jax.compare.report import RunData, Series

DPI = 120
PLOTS = ("loss_tokens", "loss_flops", "val_loss_tokens", "throughput", "cache")


def _color(i: int) -> str:
    return f"C{i % 10}"


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _curves(runs: Sequence[RunData], series: Callable[[RunData], Series], x: Callable[[RunData, Series], list],
            path: pathlib.Path, title: str, xlabel: str, ylabel: str, *, marker: str = "") -> None:
    fig, ax = _figure(title, xlabel, ylabel)
    for i, r in enumerate(runs):
        s = series(r)
        if s.steps:
            ax.plot(x(r, s), s.values, marker=marker, color=_color(i), label=r.label)
    ax.legend()
    fig.savefig(path)


def _bars(labels: Sequence[str], values: Sequence[float | None], path: pathlib.Path, title: str,
          ylabel: str) -> None:
    fig, ax = _figure(title, "", ylabel)
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color=[_color(i) for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v is not None else "n/a" for v in values])
    fig.savefig(path)


def _cache(labels: Sequence[str], rows: Sequence[dict], context_lengths: Sequence[int], path: pathlib.Path) -> None:
    fig, ax = _figure("Inference cache per sequence", "context length (tokens)", "cache size (MiB)")
    for i, (label, row) in enumerate(zip(labels, rows)):
        ax.plot(context_lengths, [row["cache_bytes"][str(n)] / 2**20 for n in context_lengths], marker="o",
                color=_color(i), label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path)


def write_all(runs: Sequence[RunData], rows: Sequence[dict], out: pathlib.Path,
              context_lengths: Sequence[int]) -> dict[str, str]:
    """Write every plot into ``out``; returns {plot name: file name}."""
    files = {name: f"{name}.png" for name in PLOTS}
    train, val = (lambda r: r.train_loss), (lambda r: r.val_loss)
    tokens, flops = (lambda r, s: r.tokens(s)), (lambda r, s: r.flops(s))
    _curves(runs, train, tokens, out / files["loss_tokens"], "Training loss", "tokens seen", "loss (nats/token)")
    _curves(runs, train, flops, out / files["loss_flops"], "Training loss against compute",
            "training FLOPs (tokens × FLOPs/token)", "loss (nats/token)")
    _curves(runs, val, tokens, out / files["val_loss_tokens"], "Validation loss", "tokens seen",
            "loss (nats/token)", marker="o")
    labels = [r.label for r in runs]
    _bars(labels, [row["tokens_per_second"] for row in rows], out / files["throughput"],
          "Training throughput (median after compilation)", "tokens / s")
    _cache(labels, rows, context_lengths, out / files["cache"])
    return files
