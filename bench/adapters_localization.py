"""ORT CPU latency and parameter counts of segmentation checkpoints (base vs pruned) on el_cracks test cells.

    python bench/adapters_localization.py --models base=runs/el_cracks_brief/checkpoints/best.ckpt \\
        pruned50=runs/adapters_loc/pruned50_ft/checkpoints/best.ckpt --rounds 20 --out runs/adapters_loc/latency

Each checkpoint is exported to fp32 ONNX with ``lineside export onnx``'s code (parity-checked against
eager torch), opened in ONNX Runtime on the CPU and called at batch 1 on real cells of the el_cracks
*test* modules (the datamodule's whole-module split, seed 0) at the checkpoint's training size: median
of ``--rounds`` calls per model, the models interleaved call by call in one process after 3 warm-up
calls each (as ``bench/prune_elpv.py`` does). Quality figures come from ``lineside test`` (see
docs/adapters.md); this script measures size and speed only. Prints a markdown table and writes
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from lineside.export.checkpoint import load_inspection_model
from lineside.export.onnx_export import export_onnx
from lineside.fusion.pruning import count_parameters
from lineside.fusion.segmentation_datamodule import SegmentationDataModule
from lineside.runtime import OnnxRuntimeBackend
from lineside.runtime.verify import verify_artefact
from lineside.vision.io import read_image
from lineside.vision.preprocess import frames_to_batch

from _runs import interleaved_latency  # noqa: E402  (bench/_runs.py)


def test_frames(size: int, channels: int, n: int) -> np.ndarray:
    dm = SegmentationDataModule(dataset="el_cracks", image_size=size, channels=channels)
    records = dm.prepare_splits()["test"][:n]
    return frames_to_batch([read_image(r.path, channels) for r in records], (size, size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=CHECKPOINT; the first is the reference")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--frames", type=int, default=8, help="test cells cycled through")
    ap.add_argument("--out", default="runs/adapters_loc/latency")
    a = ap.parse_args()
    out = Path(a.out)
    models = dict(m.split("=", 1) for m in a.models)
    results: dict = {}
    backends = {}
    size = channels = None
    for name, ckpt in models.items():
        loaded = load_inspection_model(ckpt)
        size, channels = loaded.image_size, loaded.channels
        r = export_onnx(ckpt, out / name, tta_views=1, parity_images=4, verify=verify_artefact)
        if not r.ok:
            raise SystemExit(f"{ckpt}: ONNX parity failed\n{r.parity.table()}")
        backends[name] = OnnxRuntimeBackend(r.path)
        results[name] = {"checkpoint": ckpt, "params": count_parameters(loaded.model), "onnx_mb": r.path.stat().st_size / 1e6}
        print(name, results[name], flush=True)
    images = test_frames(size, channels, a.frames)
    for name, t in interleaved_latency(backends, images, a.rounds).items():
        results[name]["latency_b1_ms"] = t * 1e3
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    ref = results[next(iter(results))]
    print(f"\n{size} px, batch 1, median of {a.rounds} calls, ONNX Runtime CPU")
    print("| model | parameters | ONNX MB | latency b1 ms (speed-up) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['onnx_mb']:.1f} | {r['latency_b1_ms']:.1f} "
              f"({ref['latency_b1_ms'] / r['latency_b1_ms']:.2f}x) |")


if __name__ == "__main__":
    main()
