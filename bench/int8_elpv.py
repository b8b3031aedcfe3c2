"""INT8 vs FP32 in ONNX Runtime on the CPU: accuracy on the ELPV test blocks, file size, latency.

    python bench/int8_elpv.py --ckpt runs/quickstart/checkpoints/best.ckpt [--out /tmp/int8_elpv] [--calib-images 256]

Exports the checkpoint's fp32 graph and its two INT8 graphs (``lineside export int8``:
calibrated on ELPV *train*-block cells, parity-checked on *val*-block cells), then measures on
the 524 cells of the ELPV *test* blocks (``block_split(labels, 60, 0.1, 0.2, 0)["test"]``, the
split ``lineside test`` reports):

* accuracy, macro-F1 and AUROC ok-vs-defective (``fusion.ensemble.grade_metrics``) of ORT FP32,
  ORT INT8 QOperator (the CPU deployment graph) and ORT INT8 Q/DQ (the TensorRT graph, for the
  record), with deltas in points against FP32, and how many test cells change grade;
* file size ratio FP32 / INT8;
* latency at batch 1 and 32: median of ``--rounds`` calls per graph, graphs interleaved call by
  call in one process on the same frames, after warm-up; ratio = FP32 median / INT8 median.

Goal of the INT8 CPU graph: at most 1 point accuracy lost, at least 3.5x smaller, at least 1.5x
faster than ORT FP32. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from lineside.runtime import OnnxRuntimeBackend  # noqa: E402
from lineside.export.quantize import export_int8  # noqa: E402
from lineside.fusion.ensemble import grade_metrics  # noqa: E402
from lineside.vision.elpv import elpv_records  # noqa: E402
from lineside.vision.io import read_image  # noqa: E402
from lineside.vision.preprocess import frames_to_batch  # noqa: E402
from lineside.vision.splits import block_split  # noqa: E402
from lineside.runtime.verify import verify_artefact  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def test_cells(size, channels) -> tuple[np.ndarray, np.ndarray]:
    records = elpv_records()
    idx = sorted(block_split([r.label for r in records], 60, 0.1, 0.2, 0)["test"])
    frames = [read_image(records[i].path, channels) for i in idx]
    return frames_to_batch(frames, size), np.array([records[i].label for i in idx])


def predict(backend, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([backend(images[i : i + batch])["grade_probs"] for i in range(0, len(images), batch)])


def latency(backends: dict, images: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    x = np.ascontiguousarray(images[:batch])
    for b in backends.values():
        for _ in range(3):
            b(x)
    times: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(rounds):
        for k, b in backends.items():
            t0 = time.perf_counter()
            b(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="/tmp/int8_elpv", help="export folder (fp32 + INT8 graphs)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--rounds-1", type=int, default=200, help="timed calls per graph at batch 1")
    ap.add_argument("--rounds-32", type=int, default=30, help="timed calls per graph at batch 32")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    t0 = time.perf_counter()
    r = export_int8(a.ckpt, None, a.out, calib_images=a.calib_images, method=a.method, verify=verify_artefact)
    export_s = time.perf_counter() - t0
    for report in r.parity.values():
        print(report.table())
    graphs = {"ORT FP32": r.source, "ORT INT8 QOperator": r.paths["qoperator"], "ORT INT8 Q/DQ": r.paths["qdq"]}
    backends = {k: OnnxRuntimeBackend(p, threads=a.threads) for k, p in graphs.items()}
    ref = backends["ORT FP32"]
    images, labels = test_cells(ref.input_size, ref.channels)

    metrics, grades = {}, {}
    for k, b in backends.items():
        probs = predict(b, images)
        metrics[k] = grade_metrics(probs, labels)
        grades[k] = probs.argmax(1)
    lat = {bs: latency(backends, images, bs, a.rounds_1 if bs == 1 else a.rounds_32) for bs in (1, 32)}

    base, fp32_mb = metrics["ORT FP32"], graphs["ORT FP32"].stat().st_size / 1e6
    print()
    print(f"INT8 vs FP32, ONNX Runtime {ort.__version__} on the CPU ({cpu_name()}, {os.cpu_count()} cores, "
          f"threads {a.threads or 'default'}); checkpoint {a.ckpt}; ELPV test blocks: {len(labels)} cells; "
          f"calibration: {r.calibration['n_images']} ELPV train-block cells ({r.calibration['method']}); export {export_s:.0f} s")
    print()
    print("| graph | MB | smaller | acc | Δacc (pt) | macro-F1 | ΔF1 (pt) | AUROC | ΔAUROC (pt) | grades changed | "
          "batch 1 ms | faster | batch 32 ms | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, m in metrics.items():
        mb = graphs[k].stat().st_size / 1e6
        changed = int((grades[k] != grades["ORT FP32"]).sum())
        row = [k, f"{mb:.2f}", f"{fp32_mb / mb:.2f}x", f"{100 * m['acc']:.2f}", f"{100 * (m['acc'] - base['acc']):+.2f}",
               f"{100 * m['macro_f1']:.2f}", f"{100 * (m['macro_f1'] - base['macro_f1']):+.2f}",
               f"{100 * m['auroc_defective']:.2f}", f"{100 * (m['auroc_defective'] - base['auroc_defective']):+.2f}", f"{changed}/{len(labels)}",
               f"{1e3 * lat[1][k]:.1f}", f"{lat[1]['ORT FP32'] / lat[1][k]:.2f}x", f"{1e3 * lat[32][k]:.1f}", f"{lat[32]['ORT FP32'] / lat[32][k]:.2f}x"]
        print("| " + " | ".join(row) + " |")
    q, name = metrics["ORT INT8 QOperator"], "ORT INT8 QOperator"
    size_ratio = fp32_mb / (graphs[name].stat().st_size / 1e6)
    goals = [
        ("accuracy loss ≤ 1 point", 100 * (base["acc"] - q["acc"]) <= 1.0, f"Δacc {100 * (q['acc'] - base['acc']):+.2f} pt"),
        ("≥ 3.5x smaller", size_ratio >= 3.5, f"{size_ratio:.2f}x"),
        ("≥ 1.5x faster at batch 1", lat[1]["ORT FP32"] / lat[1][name] >= 1.5, f"{lat[1]['ORT FP32'] / lat[1][name]:.2f}x"),
        ("≥ 1.5x faster at batch 32", lat[32]["ORT FP32"] / lat[32][name] >= 1.5, f"{lat[32]['ORT FP32'] / lat[32][name]:.2f}x"),
    ]
    print()
    for text, ok, value in goals:
        print(f"- {name} {text}: {'met' if ok else 'NOT met'} ({value})")


if __name__ == "__main__":
    main()
