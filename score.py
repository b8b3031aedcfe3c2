"""Batch offline scoring from a checkout; same as ``lineside score``.

    python score.py --model runs/quickstart/checkpoints/best.ckpt --input /data/cells --output results.csv
"""

import sys

from lineside.cli.score import main

if __name__ == "__main__":
    sys.exit(main())
