"""``python -m kda_jax.compare --workdirs runs/a runs/b ... --out reports/x [--labels a b ...]``."""

import sys

from kda_jax.compare import main

if __name__ == "__main__":
    sys.exit(main())
