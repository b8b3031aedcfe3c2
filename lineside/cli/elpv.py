"""``lineside elpv``: helpers for the built-in ELPV solar-cell data (:mod:`lineside.vision.elpv`).

    lineside elpv manifest --split test --out elpv_test.csv   # path,label,text CSV of the test blocks
"""

from __future__ import annotations

import argparse

from lineside.cli.common import add_out_arg
from lineside.vision.elpv import elpv_records, write_elpv_manifest
from lineside.vision.splits import block_split

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside elpv", description="Built-in ELPV data helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="write a path,label,text CSV of a block split (as train.py makes it)")
    m.add_argument("--split", choices=["train", "val", "test", "all"], default="test")
    add_out_arg(m, help="the manifest .csv to write")
    m.add_argument("--block-size", type=int, default=60)
    m.add_argument("--val-fraction", type=float, default=0.1)
    m.add_argument("--test-fraction", type=float, default=0.2)
    m.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    labels = [r.label for r in elpv_records()]
    idx = None
    if a.split != "all":
        idx = block_split(labels, a.block_size, a.val_fraction, a.test_fraction, a.seed)[a.split]
    out = write_elpv_manifest(a.out, idx)
    print(f"wrote {len(idx) if idx is not None else len(labels)} ELPV cells ({a.split}) to {out}")
    return 0
