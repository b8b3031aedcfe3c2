"""``lineside bench``: every backend on identical real frames, in one run (:func:`lineside.runtime.bench.run_bench`).

    lineside bench --model runs/quickstart/checkpoints/best.ckpt                        # CPU
    lineside bench --model best.ckpt --device cuda --input-size 300 --batch-size 144    # a GPU station: one module of 144 cells
    lineside bench --model grader.ckpt --compare el_dual.ckpt --input-size 300        # two models side by side, same frames
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lineside.cli.common import CHECKPOINT_HELP, add_adapter_arg, add_batch_size_arg, add_device_arg, add_model_arg, add_trust_checkpoint_arg
from lineside.runtime import bench as _bench

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside bench", description=(_bench.__doc__ or "").split("\n\n")[0])
    add_model_arg(ap, help=CHECKPOINT_HELP)
    add_device_arg(ap)
    ap.add_argument("--input-size", default=None, help="HxW of the frames (default: the training size)")
    add_batch_size_arg(ap, aliases=("--batch",), help="batch for the throughput column")
    ap.add_argument("--iters", type=int, default=30, help="batch-1 calls for the latency percentiles (at least)")
    ap.add_argument("--images", type=int, default=64, help="real frames for the parity column")
    ap.add_argument("--only", default=None, help="comma-separated substrings of backend names to run (eager always runs)")
    ap.add_argument("--calib", default=None, help="your own images instead of the ELPV test blocks")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--stability", action="store_true",
                    help="instead of the backend table: the share of grades that change under ±1 grey-level noise and a JPEG q95 "
                         "round trip (lineside.runtime.stability), on every ELPV test-block cell or the --calib images, "
                         "with --model's own backend (a checkpoint, .onnx, .pt2 or engine)")
    ap.add_argument("--compare", nargs="+", default=None, metavar="CKPT",
                    help="instead of the backend table: the throughput of --model and of these checkpoints (or artefacts) "
                         "side by side on the same frames (--input-size, default the first model's), interleaved rounds, "
                         "ratios to --model (e.g. the EL dual model beside the grading-only one)")
    ap.add_argument("--rounds", type=int, default=5, help="--compare: interleaved rounds per model")
    add_trust_checkpoint_arg(ap)
    add_adapter_arg(ap)
    return ap


def _compare(a) -> int:
    from lineside.export.calibration import real_images
    from lineside.export.checkpoint import CheckpointError
    from lineside.runtime.backend import BackendError
    from lineside.runtime.open_model import open_model

    backends = {}
    try:
        for path in [a.model, *a.compare]:
            size = a.input_size or (next(iter(backends.values())).input_size if backends else None)
            backends[str(path)] = open_model(path, "auto", a.device, size, trust_checkpoint=a.trust_checkpoint)
    except (CheckpointError, BackendError) as exc:
        print(f"lineside bench: error: {exc}", file=sys.stderr)
        return 2
    first = next(iter(backends.values()))
    sizes = {tuple(b.input_size) for b in backends.values()}
    if len(sizes) > 1:
        print(f"lineside bench: error: the models take frames of different sizes {sorted(sizes)}; give --input-size HxW", file=sys.stderr)
        return 2
    frames, _ = real_images(a.calib, first.input_size, first.channels, a.batch_size, split="test")
    if len(frames) < a.batch_size:
        frames = np.concatenate([frames] * (a.batch_size // len(frames) + 1))[: a.batch_size]
    rows = _bench.compare_throughput(backends, frames, a.rounds)
    ctx = _bench._machine(a.device) | {"input_size": list(first.input_size), "batch": len(frames), "rounds": a.rounds,
                                        "frames": "ELPV test blocks" if a.calib is None else a.calib, "backend": "each model's own backend"}
    print(_bench.format_compare(rows, ctx))
    if a.json:
        Path(a.json).write_text(json.dumps({"context": ctx, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


def _stability(a) -> int:
    from lineside.runtime.open_model import open_model
    from lineside.runtime.stability import decision_stability, format_stability, stability_frames

    from lineside.export.checkpoint import CheckpointError
    from lineside.runtime.backend import BackendError

    try:
        backend = open_model(a.model, "auto", a.device, a.input_size, trust_checkpoint=a.trust_checkpoint, adapter=a.adapter)
    except (CheckpointError, BackendError) as exc:
        print(f"lineside bench: error: {exc}", file=sys.stderr)
        return 2
    frames, _ = stability_frames(a.calib, backend.channels)
    rows = decision_stability(backend, frames, batch_size=a.batch_size)
    print(format_stability(rows, backend.describe(), a.calib or "ELPV test blocks"))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(a.model), "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.stability:
        return _stability(a)
    if a.compare:
        return _compare(a)
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    if only:
        only.append("eager")
    from lineside.export.checkpoint import CheckpointError

    try:
        rows, ctx = _bench.run_bench(a.model, a.device, a.input_size, a.batch_size, a.iters, a.images, only, a.calib,
                                     trust_checkpoint=a.trust_checkpoint)
    except CheckpointError as exc:
        print(f"lineside bench: error: {exc}", file=sys.stderr)
        return 2
    print(_bench.format_table(rows, ctx))
    if a.json:
        Path(a.json).write_text(json.dumps({"context": ctx, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if rows and not rows[0].error else 1
