"""Quality, size and ORT CPU latency of fp32 / post-training INT8 / QAT INT8 segmentation graphs on el_cracks test modules.

    python bench/qat_localization.py --write-calib runs/el_cracks_qat/calib_train.csv   # train-split cells, for --calib
    python bench/qat_localization.py --graphs fp32=export/el_cracks_ptq/model.onnx \\
        ptq_qoperator=export/el_cracks_ptq/model.qoperator.onnx qat_qoperator=export/el_cracks_qat/model.qoperator.onnx \\
        --rounds 20 --out runs/el_cracks_qat/bench

Every graph (from ``lineside export onnx`` / ``lineside export int8``) is opened in ONNX Runtime on the
CPU and run on every cell of the el_cracks *test* modules (the segmentation datamodule's whole-module
split, seed 0, 70 / 10 / 20 %) at the graph's input size. Its ``defect_masks`` output is scored with
the metric the training loop logs (:class:`lineside.fusion.segmentation_metrics.SegmentationMetrics`:
per-class IoU over the whole split, mIoU over the 4 foreground classes) against the cells' masks
resized nearest-neighbour, as ``lineside test`` does. Latency: median of ``--rounds`` batch-1 calls,
the graphs interleaved call by call after 3 warm-up calls each (as ``bench/adapters_localization.py``).
Prints a markdown table (the first graph is the reference) and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from lineside.fusion.segmentation_datamodule import SegmentationDataModule
from lineside.fusion.segmentation_metrics import SegmentationMetrics
from lineside.runtime import OnnxRuntimeBackend
from lineside.vision.el_cracks import EL_CRACK_CLASSES, read_mask
from lineside.vision.io import read_image
from lineside.vision.preprocess import frames_to_batch

from _runs import interleaved_latency  # noqa: E402  (bench/_runs.py)
from tqdm import tqdm

FOREGROUND = list(EL_CRACK_CLASSES[1:])  # dark_area, crossing, crack, busbar (mask values 1..4)
DEFECTS = [1, 2, 3]  # busbar is cell structure


def splits(size: int = 256) -> dict:
    return SegmentationDataModule(dataset="el_cracks", image_size=size, channels=1,
                                  val_fraction=0.1, test_fraction=0.2, seed=0).prepare_splits()


def test_set(size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Test-module frames (N, 1, size, size) uint8 and masks (N, size, size) int64 (nearest resize)."""
    records = splits(size)["test"]
    frames = frames_to_batch([read_image(r.path, 1) for r in records], (size, size))
    masks = []
    for r in records:
        m = torch.from_numpy(read_mask(r.mask))[None, None].float()
        masks.append(torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0].long())
    return frames, torch.stack(masks)


def score(backend, frames: np.ndarray, masks: torch.Tensor, batch: int) -> dict[str, float]:
    metrics = SegmentationMetrics(FOREGROUND, DEFECTS, thin_classes=[3])
    for i in tqdm(range(0, len(frames), batch), desc="test cells", leave=False):
        out = backend({"image": np.ascontiguousarray(frames[i:i + batch])})
        metrics.update(torch.from_numpy(np.asarray(out["defect_masks"])), torch.from_numpy(np.asarray(out["defect_heatmap"])),
                       masks[i:i + batch])
    return metrics.compute()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", nargs="+", help="NAME=ONNX; the first is the reference")
    ap.add_argument("--write-calib", help="write a CSV (path column) of the train-split cells, for `export int8 --calib`")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="cells per call when scoring")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="runs/el_cracks_qat/bench")
    a = ap.parse_args()
    if a.write_calib:
        dst = Path(a.write_calib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with dst.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path"])
            w.writerows([r.path] for r in splits(a.size)["train"])
        print(f"{dst}: {len(splits(a.size)['train'])} train-split cells")
    if not a.graphs:
        return
    graphs = dict(g.split("=", 1) for g in a.graphs)
    for name, path in graphs.items():
        if not Path(path).is_file():
            raise SystemExit(f"{path}: ONNX graph for {name!r} not found")
    frames, masks = test_set(a.size)
    print(f"{len(frames)} test cells at {a.size} px", flush=True)
    backends = {name: OnnxRuntimeBackend(path) for name, path in graphs.items()}
    results: dict = {}
    for name, b in backends.items():
        results[name] = {"onnx": graphs[name], "onnx_mb": Path(graphs[name]).stat().st_size / 1e6, **score(b, frames, masks, a.batch)}
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    for name, t in interleaved_latency(backends, frames, a.rounds).items():
        results[name]["latency_b1_ms"] = t * 1e3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    ref = results[next(iter(results))]
    print(f"\n{len(frames)} el_cracks test cells, {a.size} px; latency: batch 1, median of {a.rounds} calls, ONNX Runtime CPU")
    print("| graph | MB | smaller | mIoU % | crack IoU % | dark IoU % | crossing IoU % | busbar IoU % | crack F1 2px % | b1 ms | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['onnx_mb']:.2f} | {ref['onnx_mb'] / r['onnx_mb']:.2f}x | {100 * r['miou']:.2f} | "
              f"{100 * r['iou/crack']:.2f} | {100 * r['iou/dark_area']:.2f} | {100 * r['iou/crossing']:.2f} | "
              f"{100 * r['iou/busbar']:.2f} | {100 * r.get('crack_f1_2px', float('nan')):.2f} | "
              f"{r['latency_b1_ms']:.1f} | {ref['latency_b1_ms'] / r['latency_b1_ms']:.2f}x |")


if __name__ == "__main__":
    main()
