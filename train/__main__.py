"""``python -m kda_jax.train --gin_file=configs/experiments/<run>.gin [--gin_param=...] --workdir=...``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kda-train", description=__doc__)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file(s), applied in order")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s), e.g. TrainConfig.steps=50")
    parser.add_argument("--workdir", required=True, help="checkpoints/, metrics.jsonl, tensorboard/, config.gin")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("give at least one --gin_file (see configs/experiments/)")
    from kda_jax.train.config import parse
    from kda_jax.train.loop import train

    run = parse(args.gin_file, args.gin_param)
    summary = train(run, args.workdir, progress=not args.no_progress)
    print(f"final: step {summary['step']}, train loss {summary.get('loss', float('nan')):.4f}, "
          f"val loss {summary.get('val_loss', float('nan')):.4f} nats/token "
          f"({summary.get('val_bits_per_token', float('nan')):.3f} bits/token)")
    if "sample" in summary:
        print("sample:\n" + summary["sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
