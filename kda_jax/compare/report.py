"""Load training workdirs and write the comparison report (``report.md``, PNG plots, ``summary.json``).

A workdir of ``python -m kda_jax.train`` holds ``config.gin`` (the operative gin text of the run)
and ``metrics.jsonl`` (``kda_jax.train.metrics``). ``load_run`` re-parses the first into a
``RunConfig`` with ``train.config.parse`` — so the model, its parameter count, FLOPs and cache size
are those of the run, not of whatever the presets are today — and splits the second into training
and validation series. Everything else is derived:

- tokens seen after step ``s`` = ``s × tokens_per_step`` with ``tokens_per_step`` = rows × row length
  of the run's data (``DataConfig`` or, for synthetic tasks, ``SyntheticConfig``), as the training
  loop counts them for ``tokens_per_second``;
- training FLOPs = tokens × ``flops_per_token`` (the logged value, else ``kda_jax.train.flops``);
- final train loss = mean of the logged losses in the last ``TAIL_FRACTION`` of the run's steps (at
  least the last one), damping single-batch noise; validation numbers are the last evaluation's;
- throughput = median logged ``tokens_per_second``, leaving out the first window (it includes
  compilation) when there is more than one;
- inference cache = ``kda_jax.inference.cache_bytes`` of one sequence at each context length.

The report also states whether the runs share their recipe (data, optimiser, training, mesh
configs) and which model fields differ, since a comparison is only fair when the model is all that
changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import tokenize
from typing import Sequence

from kda_jax.inference.cache import cache_bytes
from kda_jax.models import ModelConfig, count_params
from kda_jax.train.config import RunConfig, parse
from kda_jax.train.flops import flops_per_token
from kda_jax.train.metrics import METRICS_FILE, read_metrics

CONFIG_FILE = "config.gin"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
TAIL_FRACTION = 0.1
CONTEXT_LENGTHS = (1024, 4096, 32768, 131072)
RECIPE_PARTS = ("data", "optim", "train", "mesh", "synthetic")


@dataclasses.dataclass(frozen=True)
class Series:
    """A logged scalar at increasing steps (a resumed run's repeated steps keep the later value)."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class RunData:
    label: str
    workdir: pathlib.Path
    run: RunConfig
    train_loss: Series
    val_loss: Series
    val_ppl: Series
    tokens_per_second: Series
    tokens_per_step: int
    flops_per_token: float          # training FLOPs per token (forward + backward)

    @property
    def model(self) -> ModelConfig:
        return self.run.model

    def tokens(self, series: Series) -> list[int]:
        return [s * self.tokens_per_step for s in series.steps]

    def flops(self, series: Series) -> list[float]:
        return [s * self.tokens_per_step * self.flops_per_token for s in series.steps]


def _series(records: list[dict], key: str) -> Series:
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}  # later lines overwrite
    steps = tuple(sorted(by_step))
    return Series(steps, tuple(by_step[s] for s in steps))


def _row_shape(run: RunConfig) -> tuple[int, int]:
    """(global rows, row length) of a training batch, as ``train.loop`` counts tokens."""
    synthetic = getattr(run, "synthetic", None)
    if synthetic is not None:
        return synthetic.batch_size, synthetic.seq_len
    return run.data.batch_size, run.data.seq_len


def load_run(workdir, label: str | None = None) -> RunData:
    """Read ``workdir/config.gin`` and ``workdir/metrics.jsonl``; errors name the workdir and the file."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist (or is not a directory)")
    config_path, metrics_path = workdir / CONFIG_FILE, workdir / METRICS_FILE
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(f"workdir {workdir} has no {path.name}: is it a training workdir "
                                    f"(python -m kda_jax.train --workdir={workdir})?")
    try:
        run = parse([config_path])
    except (ValueError, KeyError, TypeError, SyntaxError, tokenize.TokenError) as e:
        raise ValueError(f"workdir {workdir}: {CONFIG_FILE} does not parse: {e}") from e
    try:
        records = [r for r in read_metrics(workdir) if "text" not in r]
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"workdir {workdir}: {METRICS_FILE} is corrupt: {e}") from e
    train_loss = _series(records, "loss")
    if not train_loss.steps:
        raise ValueError(f"workdir {workdir}: {METRICS_FILE} has no training-loss records (empty or "
                         f"stopped before the first log step)")
    rows, row_len = _row_shape(run)
    logged_flops = _series(records, "flops_per_token").values
    flops = logged_flops[-1] if logged_flops else float(flops_per_token(run.model, row_len)["train"])
    val_loss = _series(records, "val_loss")
    val_ppl = _series(records, "val_ppl")
    if not val_ppl.steps and val_loss.steps:
        val_ppl = Series(val_loss.steps, tuple(math.exp(min(v, 50.0)) for v in val_loss.values))
    return RunData(label=label or workdir.resolve().name, workdir=workdir, run=run, train_loss=train_loss,
                   val_loss=val_loss, val_ppl=val_ppl, tokens_per_second=_series(records, "tokens_per_second"),
                   tokens_per_step=rows * row_len, flops_per_token=flops)


def load_runs(workdirs: Sequence, labels: Sequence[str] | None = None) -> list[RunData]:
    """``load_run`` of each workdir; labels default to the workdir names (made unique with parents)."""
    if not workdirs:
        raise ValueError("give at least one workdir")
    paths = [pathlib.Path(w) for w in workdirs]
    if labels is None:
        labels = _default_labels(paths)
    elif len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} workdirs")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {list(labels)}")
    return [load_run(p, lab) for p, lab in zip(paths, labels)]


def _default_labels(paths: list[pathlib.Path]) -> list[str]:
    for depth in (1, 2, 3):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError(f"workdirs {[str(p) for p in paths]} have the same names; pass labels")


def layout(model: ModelConfig) -> str:
    """``"3:1 (12 KDA + 4 MLA)"``-style description of the mixer pattern (GDN for ``kda_gate='gdn'``)."""
    n_kda, n_mla = len(model.kda_layers), len(model.full_attn_layers)
    linear = "GDN" if model.kda_gate == "gdn" else "KDA"
    if n_mla == 0:
        return f"all {linear} ({n_kda})"
    ratio = f"{n_kda // n_mla}:1" if n_kda % n_mla == 0 else f"{n_kda}:{n_mla}"
    return f"{ratio} ({n_kda} {linear} + {n_mla} MLA)" if n_kda else f"0:1 (all {n_mla} MLA)"


def tail_mean(series: Series, fraction: float = TAIL_FRACTION) -> float:
    """Mean of the values logged after ``(1 - fraction) × last step`` (at least the last value)."""
    last = series.steps[-1]
    values = [v for s, v in zip(series.steps, series.values) if s > (1.0 - fraction) * last]
    return statistics.fmean(values or [series.values[-1]])


def steady_throughput(series: Series) -> float | None:
    """Median tokens/s without the first logged window (compilation), or that window if it is all."""
    values = series.values[1:] or series.values
    return statistics.median(values) if values else None


def summarize(r: RunData, context_lengths: Sequence[int] = CONTEXT_LENGTHS) -> dict:
    """One row of the results table (plain JSON types)."""
    total, activated = count_params(r.model)
    return {
        "label": r.label,
        "workdir": str(r.workdir),
        "layout": layout(r.model),
        "params_total": total,
        "params_activated": activated,
        "steps": r.train_loss.steps[-1],
        "tokens": r.train_loss.steps[-1] * r.tokens_per_step,
        "train_flops": r.train_loss.steps[-1] * r.tokens_per_step * r.flops_per_token,
        "train_loss": tail_mean(r.train_loss),
        "val_loss": r.val_loss.values[-1] if r.val_loss.values else None,
        "val_ppl": r.val_ppl.values[-1] if r.val_ppl.values else None,
        "tokens_per_second": steady_throughput(r.tokens_per_second),
        "cache_bytes": {str(n): cache_bytes(r.model, n, 1)["total"] for n in context_lengths},
    }


def config_differences(runs: Sequence[RunData]) -> dict[str, dict[str, list]]:
    """``{"model": {field: [value per run]}, "data": {...}, ...}`` for the fields that differ."""
    out: dict[str, dict[str, list]] = {}
    for part in ("model",) + RECIPE_PARTS:
        values = [getattr(r.run, part, None) for r in runs]
        dicts = [dataclasses.asdict(v) if v is not None else {} for v in values]
        fields = sorted(set().union(*dicts))
        diff = {f: [d.get(f) for d in dicts] for f in fields if len({repr(d.get(f)) for d in dicts}) > 1}
        if diff:
            out[part] = diff
    return out


def _fmt_count(n: float | None, unit: str = "") -> str:
    if n is None:
        return "–"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _fmt_bytes(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(rows: Sequence[dict], differences: dict, plots: dict[str, str],
                    context_lengths: Sequence[int]) -> str:
    """The report text; ``plots`` maps plot names to file names relative to the report."""
    results = _table(
        ["run", "mixers", "params total / activated", "tokens", "train FLOPs", "train loss", "val loss", "val PPL",
         "tokens/s"],
        [[r["label"], r["layout"], f"{_fmt_count(r['params_total'])} / {_fmt_count(r['params_activated'])}",
          _fmt_count(r["tokens"]), _fmt_count(r["train_flops"]), _fmt(r["train_loss"]), _fmt(r["val_loss"]),
          _fmt(r["val_ppl"], 3), _fmt(r["tokens_per_second"], 0)] for r in rows])
    cache = _table(["run"] + [f"{n:,} tokens" for n in context_lengths],
                   [[r["label"]] + [_fmt_bytes(r["cache_bytes"][str(n)]) for n in context_lengths] for r in rows])
    recipe = [f"- {part}: " + "; ".join(f"`{f}` = " + " / ".join(repr(v) for v in vals) for f, vals in d.items())
              for part, d in differences.items() if part != "model"]
    model = differences.get("model", {})
    model_lines = [f"- `{f}`: " + " / ".join(repr(v) for v in vals) for f, vals in model.items()]
    parts = [
        "# Run comparison", "",
        f"Runs: {', '.join(r['label'] for r in rows)} (values in that order below). Final train loss: mean of "
        f"the logged losses over the last {TAIL_FRACTION:.0%} of steps; validation: the last evaluation; "
        "tokens/s: median over the logged windows after the first (which includes compilation).", "",
        "## Results (cf. paper Table 1)", "", results, "",
        "## Fairness", "",
        ("The runs share their recipe (data, optimiser, training and mesh configs)." if not recipe else
         "**The recipes differ** — the comparison is not at equal settings:\n" + "\n".join(recipe)), "",
        ("Model fields that differ:\n" + "\n".join(model_lines)) if model_lines else "The models are identical.", "",
        "## Training loss", "", f"![training loss against tokens]({plots['loss_tokens']})", "",
        f"![training loss against training FLOPs]({plots['loss_flops']})", "",
        "## Validation loss", "", f"![validation loss against tokens]({plots['val_loss_tokens']})", "",
        "## Throughput", "", f"![training throughput]({plots['throughput']})", "",
        "## Inference cache per sequence", "",
        "KDA/GDN layers keep a constant-size state; MLA layers a latent per token (bf16 latents, float32 "
        "states; `kda_jax.inference.cache_bytes`).", "", cache, "", f"![cache bytes]({plots['cache']})", "",
    ]
    return "\n".join(parts)


def write_report(workdirs: Sequence, out, labels: Sequence[str] | None = None,
                 context_lengths: Sequence[int] = CONTEXT_LENGTHS) -> pathlib.Path:
    """Compare the runs of ``workdirs``; writes ``out/report.md``, its PNGs and ``summary.json``.

    Returns the path of ``report.md``.
    """
    from kda_jax.compare import plots

    if not context_lengths or any(int(n) < 1 for n in context_lengths):
        raise ValueError(f"context_lengths must be positive integers, got {list(context_lengths)}")
    context_lengths = tuple(int(n) for n in context_lengths)
    runs = load_runs(workdirs, labels)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r, context_lengths) for r in runs]
    differences = config_differences(runs)
    files = plots.write_all(runs, rows, out, context_lengths)
    report = out / REPORT_FILE
    report.write_text(render_markdown(rows, differences, files, context_lengths), encoding="utf-8")
    summary = {"runs": rows, "differences": differences, "plots": files}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=repr), encoding="utf-8")
    return report
