"""Compare training runs: ``kda-compare --workdirs runs/a runs/b --out reports/ab``.

Reads each workdir's ``config.gin`` and ``metrics.jsonl`` and writes ``report.md`` (a results table
in the spirit of the paper's Table 1, a fairness check of the recipes, inference-cache sizes), the
PNG plots it embeds (``kda_jax.compare.plots``) and ``summary.json`` with the same numbers. The
loading, the derived quantities and the text are in ``kda_jax.compare.report``.
"""

from __future__ import annotations

import argparse

from kda_jax.compare.report import (CONTEXT_LENGTHS, RunData, Series, config_differences, layout, load_run,
                                    load_runs, summarize, write_report)

__all__ = ["CONTEXT_LENGTHS", "RunData", "Series", "config_differences", "layout", "load_run", "load_runs",
           "summarize", "write_report", "main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kda-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--workdirs", nargs="+", required=True, help="training workdirs (python -m kda_jax.train)")
    parser.add_argument("--out", required=True, help="report directory (created; files in it are overwritten)")
    parser.add_argument("--labels", nargs="+", help="one short name per workdir (default: the workdir names)")
    parser.add_argument("--context_lengths", nargs="+", type=int, default=list(CONTEXT_LENGTHS),
                        help="context lengths for the inference-cache table")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.workdirs, args.out, labels=args.labels, context_lengths=args.context_lengths)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"kda-compare: error: {e}\n")
    print(f"wrote {report}")
    return 0
