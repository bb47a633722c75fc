"""Training metrics: a JSON-lines log plus TensorBoard scalars, and step throughput.

``workdir/metrics.jsonl`` is the record of a run: one JSON object per line, written and flushed
by ``MetricsWriter.write`` as ``{"step": s, "time": unix_seconds, **metrics}`` or, for text,
``{"step": s, "time": t, "tag": tag, "text": text}``. JSON has no NaN or infinity, so non-finite
scalars are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (Python's and
JavaScript's spellings; ``null`` would lose which one it was) and ``read_metrics`` turns them back
into floats in scalar records. A run killed mid-write leaves a truncated last line: the reader
skips it, and a writer reopening the file cuts it off before appending. A resumed run appends,
so steps after the restored checkpoint may appear twice; the later line is the resumed run's.

TensorBoard event files go to ``workdir/tensorboard/`` through tensorboardX (no TensorFlow). Its
writer thread flushes every ``TB_FLUSH_SECS`` and on ``close()``, so a killed run may lose the
last few seconds there, never in the JSONL.

Only process 0 (``jax.process_index() == 0``) writes; on other processes the writer is a no-op.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import time

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
TB_FLUSH_SECS = 10
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _scalar(name: str, value) -> int | float:
    """A Python int or float from a Python, NumPy or JAX scalar (bools become ints)."""
    arr = np.asarray(value)
    v = arr.reshape(()).item() if arr.size == 1 else None
    if not isinstance(v, (bool, int, float)):  # .item() of bfloat16 is a float too
        raise ValueError(f"metric {name!r} must be a real scalar, got {value!r}")
    return int(v) if isinstance(v, (bool, int)) else float(v)


def _to_json(v: int | float) -> int | float | str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def _drop_partial_line(path: pathlib.Path) -> None:
    """Cut a killed run's unterminated last line so that appended lines stay valid JSONL."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    def __init__(self, workdir, *, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.active = jax.process_index() == 0
        self._file = self._tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        _drop_partial_line(path)
        self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            import tensorboardX

            self._tb = tensorboardX.SummaryWriter(str(self.workdir / TB_DIR), flush_secs=TB_FLUSH_SECS)

    def _append(self, record: dict) -> None:
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line with these scalars and write them to TensorBoard at ``step``."""
        if not self.active:
            return
        reserved = {"step", "time", "tag", "text"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved")
        now, step = time.time(), int(step)
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        self._append({"step": step, "time": now, **{k: _to_json(v) for k, v in values.items()}})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), global_step=step, walltime=now)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text (e.g. a generated sample) at ``step``: TensorBoard's text tab and one JSON line."""
        if not self.active:
            return
        now, step = time.time(), int(step)
        self._append({"step": step, "time": now, "tag": tag, "text": str(text)})
        if self._tb is not None:
            self._tb.add_text(tag, str(text), global_step=step, walltime=now)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in file order, non-finite strings back as floats.

    An unterminated last line that does not parse (a killed run) is skipped; any other bad line
    raises ``ValueError``.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: cut off mid-write
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {e}") from e
        if "text" not in record:
            record = {k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
        records.append(record)
    return records


class Throughput:
    """Step time and tokens per second over timed steps, excluding the first ``warmup_steps``.

    The first step of a jitted train step includes compilation, so it is not timed by default.
    Feed durations with ``add(seconds, tokens)`` or let ``tick()`` measure the wall time since the
    previous ``tick()`` (or construction, or ``restart_clock()`` after a pause such as evaluation;
    block on the step's outputs before ticking). ``window`` keeps only the latest timed steps.
    """

    def __init__(self, tokens_per_step: int | None = None, *, warmup_steps: int = 1, window: int | None = None):
        if warmup_steps < 0 or (window is not None and window < 1):
            raise ValueError(f"need warmup_steps >= 0 and window >= 1, got {warmup_steps}, {window}")
        self.tokens_per_step, self.warmup_steps = tokens_per_step, warmup_steps
        self.steps_seen = 0
        self._timed = collections.deque(maxlen=window)  # (seconds, tokens)
        self._last = time.perf_counter()

    def add(self, seconds: float, tokens: int | None = None) -> None:
        tokens = self.tokens_per_step if tokens is None else tokens
        if tokens is None:
            raise ValueError("tokens not given and no tokens_per_step set")
        self.steps_seen += 1
        if self.steps_seen > self.warmup_steps:
            self._timed.append((float(seconds), int(tokens)))

    def tick(self, tokens: int | None = None) -> float:
        """Record the time since the last tick as one step; returns it in seconds."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.add(seconds, tokens)
        return seconds

    def restart_clock(self) -> None:
        self._last = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """``step_time_s`` (mean) and ``tokens_per_s`` (tokens / time) of the timed steps; {} if none."""
        if not self._timed:
            return {}
        seconds = sum(s for s, _ in self._timed)
        tokens = sum(t for _, t in self._timed)
        return {"step_time_s": seconds / len(self._timed),
                "tokens_per_s": tokens / seconds if seconds > 0 else math.inf}
