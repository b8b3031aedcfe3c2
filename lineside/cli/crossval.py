"""``lineside crossval``: k fold models → out-of-fold decision offsets → one ensemble (:func:`lineside.fusion.crossval.run_crossval`).

    lineside crossval --config configs/el_grading_cv.yaml --folds 5 --out runs/el_grading_cv
    lineside crossval --config configs/el_grading.yaml --data.manifest cells.csv --out runs/my_cv

Any other ``--section.key value`` argument overrides the config as in ``lineside fit``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lineside.cli.common import add_out_arg, add_trust_checkpoint_arg
from lineside.fusion.checkpoint_file import CheckpointError
from lineside.fusion.crossval import OBJECTIVES, run_crossval

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lineside crossval",
        description="lineside cross-validation: fold models, out-of-fold decision offsets, one ensemble checkpoint",
        epilog="Other arguments (--data.manifest FILE, --trainer.max_epochs N, ...) override the config as in train.py.",
    )
    ap.add_argument("--config", required=True, action="append", help="training config (as for train.py); repeatable")
    ap.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    add_out_arg(ap, type=Path, help="output folder (fold models, predictions, ensemble.ckpt, report)")
    ap.add_argument("--run-folds", type=int, nargs="+", default=None, metavar="K", help="train only these folds (others: elsewhere or later)")
    ap.add_argument("--with", dest="with_runs", type=Path, nargs="+", default=None, metavar="DIR",
                    help="finished crossval folders (same data/folds, another recipe) to ensemble with this one")
    ap.add_argument("--objective", default="mean", choices=list(OBJECTIVES), help="what the decision offsets maximise (mean = average of macro-F1 and accuracy)")
    add_trust_checkpoint_arg(ap, help="fold checkpoints (those of --with folders too) that a weights-only load refuses are "
                             "loaded as full pickles, which can run arbitrary code; only for folders from a trusted source")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a, rest = ap.parse_known_args(argv)
    if a.folds < 2:
        ap.error("--folds must be >= 2")
    if a.run_folds and not all(0 <= k < a.folds for k in a.run_folds):
        ap.error(f"--run-folds must be in 0..{a.folds - 1}")
    config_args = [x for c in a.config for x in ("--config", c)] + rest
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_crossval(config_args, a.folds, a.out, a.objective, a.run_folds, a.with_runs, a.trust_checkpoint)
    except CheckpointError as exc:
        print(f"lineside crossval: error: {exc}", file=sys.stderr)
        return 2
    return 0
