"""Whole-module EL frames: how well the cell grid is found, and how many modules a second.

    python bench/module_tiling.py                                   # 30 modules, the quickstart model
    python bench/module_tiling.py --modules 60 --model export/quickstart/model.onnx --throughput-modules 10

All modules are **generated** from real ELPV cells (:mod:`lineside.vision.module_synth`): the layouts
6x10, 6x12 and 12x12 half-cells in turn, cells of 80–200 px, a random perspective warp (corners moved
by up to 1–6 % of the module's size, a rotation of up to 5°), uneven light, blur and sensor noise
(σ 1–5 grey levels). The generator knows the grid, so:

1. **grid finding** (:func:`lineside.vision.module_grid.find_module_grid`, no hint): the share of
   modules whose row and column counts come out right, and for those the error of the grid line
   crossings (gap centres and outer lines, (rows + 1) x (cols + 1) points a module) in image px:
   mean, 95th percentile and maximum over all points; the time to find a grid;
2. **grades against the original cells**: modules of 300-px cells (ELPV's own size) scored with
   ``--model``; the share of cells whose grade equals the grade of the original ELPV file, and for
   scale the same model's agreement with itself on the original cells shifted by 3 px;
3. **throughput**: ``--throughput-modules`` 6x10 modules of 200-px cells (about 3 Mpx) scored end to
   end through :class:`lineside.runtime.module_score.ModuleTiler` (grid, cutting, the one resize, the
   backend on the 60 cells as one batch, records), modules/s and cells/s, beside the same backend on 60
   single 300-px ELPV cells a batch (decoded, in memory); a checkpoint runs as its cached ONNX export
   in ONNX Runtime, as ``lineside score`` does on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = [(6, 10, False), (6, 12, False), (12, 12, True)]


def grid_accuracy(n: int, seed: int) -> dict:
    from lineside.vision.module_grid import ModuleGridError, find_module_grid
    from lineside.vision.module_synth import synth_module
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    right, errors, seconds, failures = 0, [], [], []
    per_layout: dict[str, list[int]] = {}
    for i in tqdm(range(n), desc="grid finding", unit="module"):
        rows, cols, half = LAYOUTS[i % len(LAYOUTS)]
        m = synth_module(rows, cols, cell_px=int(rng.integers(80, 201)), half=half, warp=float(rng.uniform(0.01, 0.06)),
                         rotate_deg=float(rng.uniform(0, 5)), noise=float(rng.uniform(1, 5)), seed=int(rng.integers(1 << 30)))
        key = f"{rows}x{cols}{' half-cells' if half else ''}"
        t = time.perf_counter()
        try:
            grid = find_module_grid(m.image)
        except ModuleGridError as exc:
            failures.append(str(exc))
            per_layout.setdefault(key, []).append(0)
            continue
        seconds.append(time.perf_counter() - t)
        ok = (grid.rows, grid.cols) == (rows, cols)
        per_layout.setdefault(key, []).append(int(ok))
        if ok:
            right += 1
            errors.append(np.linalg.norm(grid.nodes() - m.nodes, axis=-1).ravel())
    err = np.concatenate(errors) if errors else np.array([np.nan])
    return {"n": n, "right": right, "per_layout": {k: (sum(v), len(v)) for k, v in per_layout.items()},
            "err_mean": float(err.mean()), "err_p95": float(np.percentile(err, 95)), "err_max": float(err.max()),
            "seconds": float(np.median(seconds)) if seconds else float("nan"), "failures": failures}


def grade_agreement(backend, n: int, seed: int) -> dict:
    from lineside.runtime.module_score import ModuleTiler
    from lineside.runtime.records import RecordBuilder
    from lineside.vision.elpv import elpv_records
    from lineside.vision.io import read_image
    from lineside.vision.module_synth import synth_module
    from lineside.vision.preprocess import frames_to_batch

    records = elpv_records()
    tiler, builder = ModuleTiler("6x10"), RecordBuilder(backend)
    agree = total = shift_agree = 0
    for i in range(n):
        m = synth_module(6, 10, cell_px=300, warp=0.03, noise=2.0, seed=seed + 1000 + i)
        res = tiler.score(backend, builder, [m.image[..., None]], [f"module {i}"])[0]
        if isinstance(res, str):
            raise RuntimeError(res)
        cells = [read_image(records[k].path, 1) for k in m.cells.ravel()]
        direct = backend(frames_to_batch(cells, backend.input_size))["grade_probs"].argmax(1)
        shifted = [np.pad(c, ((3, 0), (3, 0), (0, 0)), mode="edge")[:300, :300] for c in cells]
        shift = backend(frames_to_batch(shifted, backend.input_size))["grade_probs"].argmax(1)
        tiled = np.array([c["grade"] for c in res.record["cells"]])
        agree += int((tiled == direct).sum())
        shift_agree += int((shift == direct).sum())
        total += len(direct)
    return {"cells": total, "agree": agree / total, "shift_agree": shift_agree / total}


def throughput(backend, n: int, seed: int) -> dict:
    from lineside.runtime.module_score import ModuleTiler
    from lineside.runtime.records import RecordBuilder
    from lineside.vision.module_synth import synth_module

    mods = [synth_module(6, 10, cell_px=200, seed=seed + 2000 + i).image[..., None] for i in range(n)]
    tiler, builder = ModuleTiler(), RecordBuilder(backend)
    tiler.score(backend, builder, mods[:1], ["warm-up"])  # first call: allocation
    grid_s = 0.0
    t0 = time.perf_counter()
    for i, image in enumerate(mods):
        t = time.perf_counter()
        tiler.find(image, f"module {i}")
        grid_s += time.perf_counter() - t
    t1 = time.perf_counter()
    for i, image in enumerate(mods):
        res = tiler.score(backend, builder, [image], [f"module {i}"])[0]
        assert not isinstance(res, str), res
    total = time.perf_counter() - t1
    from lineside.vision.elpv import elpv_records
    from lineside.vision.io import read_image
    from lineside.vision.preprocess import frames_to_batch

    records = elpv_records()  # the baseline: as many single 300-px cells, already cut, decoded and in memory
    cells = [read_image(records[k].path, 1) for k in range(60)]
    t2 = time.perf_counter()
    for _ in range(n):
        backend(frames_to_batch(cells, backend.input_size))
    single = time.perf_counter() - t2
    return {"single_cells_per_s": 60 * n / single,
"n": n, "pixels": mods[0].shape[0] * mods[0].shape[1], "modules_per_s": n / total, "cells_per_s": 60 * n / total,
            "grid_ms": 1000 * grid_s / n, "module_ms": 1000 * total / n, "find_pass_s": t1 - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", type=int, default=30, help="generated modules for the grid accuracy (default 30)")
    ap.add_argument("--model", default=str(REPO / "runs" / "quickstart" / "checkpoints" / "best.ckpt"),
                    help="a grading checkpoint or export (default: the quickstart model)")
    ap.add_argument("--agreement-modules", type=int, default=4, help="6x10 modules of 300-px cells for the grade agreement (default 4)")
    ap.add_argument("--throughput-modules", type=int, default=6, help="6x10 modules timed end to end (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    acc = grid_accuracy(a.modules, a.seed)
    print(f"\ngrid finding on {acc['n']} generated modules (no hint): counts right {acc['right']}/{acc['n']}; "
          f"crossing error mean {acc['err_mean']:.2f} px, p95 {acc['err_p95']:.2f} px, max {acc['err_max']:.2f} px; "
          f"median {1000 * acc['seconds']:.0f} ms a module")
    for k, (r, t) in acc["per_layout"].items():
        print(f"  {k}: {r}/{t} counts right")
    for f in acc["failures"]:
        print(f"  failed: {f}")
    if a.agreement_modules <= 0 and a.throughput_modules <= 0:
        return 0
    if not os.path.exists(a.model):
        print(f"{a.model}: no model; skipping grades and throughput (train one: make quickstart)", file=sys.stderr)
        return 0
    from lineside.runtime.open_model import open_model

    backend = open_model(a.model)
    print(f"\nmodel: {backend.describe()}, input {backend.input_size[0]}x{backend.input_size[1]}")
    if a.agreement_modules > 0:
        g = grade_agreement(backend, a.agreement_modules, a.seed)
        print(f"grades of {g['cells']} module cells (300-px cells) equal to the original ELPV cells' grades: {100 * g['agree']:.1f}% "
              f"(the same model on the original cells shifted by 3 px: {100 * g['shift_agree']:.1f}%)")
    if a.throughput_modules > 0:
        t = throughput(backend, a.throughput_modules, a.seed)
        print(f"throughput, {t['n']} 6x10 modules of {t['pixels'] / 1e6:.1f} Mpx: {t['modules_per_s']:.2f} modules/s "
              f"({t['cells_per_s']:.0f} cells/s), {t['module_ms']:.0f} ms a module of which grid finding and cutting {t['grid_ms']:.0f} ms; "
              f"single cells in batches of 60: {t['single_cells_per_s']:.0f} cells/s (module cells at "
              f"{t['cells_per_s'] / t['single_cells_per_s']:.2f}x that rate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
