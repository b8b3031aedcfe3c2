"""Quantization-aware training vs post-training INT8, in ONNX Runtime on the CPU: accuracy on the ELPV
test blocks, file size, latency.

    lineside fit --config configs/quickstart_qat.yaml          # QAT fine-tune of runs/quickstart/checkpoints/best.ckpt
    python bench/qat_elpv.py --float-ckpt runs/quickstart/checkpoints/best.ckpt \\
        --qat-ckpt runs/quickstart_qat/checkpoints/best.ckpt [--out /tmp/qat_elpv]

Exports, from the float checkpoint, its fp32 graph and today's post-training INT8 graphs
(``lineside export int8``: calibrated on ELPV *train*-block cells, parity on *val*-block cells), and
from the QAT checkpoint its INT8 graphs (``lineside export int8`` on a QAT checkpoint: Q/DQ at the scales learnt in QAT,
QOperator with the trained INT8 weights; parity against the fake-quantized model). Then, on the 524
cells of the ELPV *test* blocks (``block_split(labels, 60, 0.1, 0.2, 0)["test"]``, as
``bench/int8_elpv.py`` and ``lineside test``):

* accuracy, macro-F1, AUROC ok-vs-defective of every graph, deltas in points against the float model's
  fp32 graph, and how many test cells change grade;
* file size ratio fp32 / graph;
* latency at batch 1 and 32: median of ``--rounds-1`` / ``--rounds-32`` calls per graph, graphs
  interleaved call by call in one process on the same frames, after warm-up.

The ONNX Runtime rows that deploy on the CPU are the QOperator graphs; the Q/DQ graphs are TensorRT's
(ONNX Runtime runs them mostly in float kernels) and are listed for their accuracy. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime as ort
from int8_elpv import cpu_name, latency, predict, test_cells
from lineside.export.qat_export import export_qat
from lineside.export.quantize import export_int8
from lineside.fusion.ensemble import grade_metrics
from lineside.runtime import OnnxRuntimeBackend
from lineside.runtime.verify import verify_artefact


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float-ckpt", required=True, help="the float checkpoint QAT started from")
    ap.add_argument("--qat-ckpt", required=True, help="the QAT checkpoint (configs/quickstart_qat.yaml)")
    ap.add_argument("--out", default="/tmp/qat_elpv", help="export folder (ptq/, qat/)")
    ap.add_argument("--calib-images", type=int, default=256, help="post-training INT8 (and the QAT QOperator activations) calibration cells")
    ap.add_argument("--parity-images", type=int, default=64)
    ap.add_argument("--rounds-1", type=int, default=100, help="timed calls per graph at batch 1")
    ap.add_argument("--rounds-32", type=int, default=15, help="timed calls per graph at batch 32")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    out = Path(a.out)
    t0 = time.perf_counter()
    ptq = export_int8(a.float_ckpt, None, out / "ptq", calib_images=a.calib_images, parity_images=a.parity_images, verify=verify_artefact)
    t_ptq = time.perf_counter() - t0
    t0 = time.perf_counter()
    qat = export_qat(a.qat_ckpt, out / "qat", calib_images=a.calib_images, parity_images=a.parity_images, verify=verify_artefact)
    t_qat = time.perf_counter() - t0
    for name, r in (("post-training", ptq), ("QAT", qat)):
        for fmt, report in r.parity.items():
            print(f"[{name} {fmt}] " + report.table())
    graphs = {
        "fp32 (float model)": ptq.source,
        "PTQ INT8 QOperator": ptq.paths["qoperator"],
        "QAT INT8 QOperator": qat.paths["qoperator"],
        "PTQ INT8 Q/DQ (TensorRT graph)": ptq.paths["qdq"],
        "QAT INT8 Q/DQ (TensorRT graph)": qat.paths["qdq"],
        "fp32 of the QAT weights": qat.paths["qdq"].parent / "fp32" / "model.onnx",
    }
    backends = {k: OnnxRuntimeBackend(p, threads=a.threads) for k, p in graphs.items()}
    ref = backends["fp32 (float model)"]
    images, labels = test_cells(ref.input_size, ref.channels)
    metrics, grades = {}, {}
    for k, b in backends.items():
        probs = predict(b, images)
        metrics[k] = grade_metrics(probs, labels)
        grades[k] = probs.argmax(1)
    timed = {k: backends[k] for k in ("fp32 (float model)", "PTQ INT8 QOperator", "QAT INT8 QOperator")}
    lat = {bs: latency(timed, images, bs, a.rounds_1 if bs == 1 else a.rounds_32) for bs in (1, 32)}

    base = metrics["fp32 (float model)"]
    fp32_mb = graphs["fp32 (float model)"].stat().st_size / 1e6
    print()
    print(f"QAT vs post-training INT8, ONNX Runtime {ort.__version__} on the CPU ({cpu_name()}, {os.cpu_count()} cores, "
          f"threads {a.threads or 'default'}); float {a.float_ckpt}, QAT {a.qat_ckpt}; ELPV test blocks: {len(labels)} cells; "
          f"calibration {a.calib_images} ELPV train-block cells; exports: post-training {t_ptq:.0f} s, QAT {t_qat:.0f} s")
    print()
    print("| graph | MB | smaller | acc | Δacc (pt) | macro-F1 | ΔF1 (pt) | AUROC | ΔAUROC (pt) | grades changed | batch 1 ms | faster | batch 32 ms | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, m in metrics.items():
        mb = graphs[k].stat().st_size / 1e6
        changed = int((grades[k] != grades["fp32 (float model)"]).sum())
        row = [k, f"{mb:.2f}", f"{fp32_mb / mb:.2f}x", f"{100 * m['acc']:.2f}", f"{100 * (m['acc'] - base['acc']):+.2f}",
               f"{100 * m['macro_f1']:.2f}", f"{100 * (m['macro_f1'] - base['macro_f1']):+.2f}",
               f"{100 * m['auroc_defective']:.2f}", f"{100 * (m['auroc_defective'] - base['auroc_defective']):+.2f}", f"{changed}/{len(labels)}"]
        if k in timed:
            row += [f"{1e3 * lat[1][k]:.1f}", f"{lat[1]['fp32 (float model)'] / lat[1][k]:.2f}x",
                    f"{1e3 * lat[32][k]:.1f}", f"{lat[32]['fp32 (float model)'] / lat[32][k]:.2f}x"]
        else:
            row += ["–"] * 4
        print("| " + " | ".join(row) + " |")
    q, p = metrics["QAT INT8 QOperator"], metrics["PTQ INT8 QOperator"]
    print()
    print(f"- QAT INT8 QOperator vs post-training INT8 QOperator: Δacc {100 * (q['acc'] - p['acc']):+.2f} pt, "
          f"ΔF1 {100 * (q['macro_f1'] - p['macro_f1']):+.2f} pt, ΔAUROC {100 * (q['auroc_defective'] - p['auroc_defective']):+.2f} pt")


if __name__ == "__main__":
    main()
