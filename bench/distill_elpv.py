"""Distillation to a small student on ELPV: student vs teacher accuracy / macro-F1 / AUROC and ORT CPU speed, in one run.

1. ``lineside fit --config configs/elpv_student.yaml`` (the student, distilled from the teacher; capped by its
   ``trainer.max_time``), unless ``--skip-fit``;
2. ``lineside test`` of the teacher and of the student's best checkpoint on the ELPV module-block test split;
3. ``lineside bench --only "onnxruntime fp32"`` of both on the same 300x300 cells (the deployable module
   resizes in-graph to each model's own size), batch-1 latency and batched throughput.

    python bench/distill_elpv.py                                   # → runs/distill_elpv/
    python bench/distill_elpv.py --teacher runs/cv/ensemble.ckpt --teacher-config configs/quickstart.yaml

Prints the table and writes it as JSON (``OUT/results_<student-name>.json``). ``--init-from-teacher`` starts the
student's backbone from the teacher's (both are EfficientNet-Lite0) instead of ImageNet. Machine-dependent: quote it with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _runs import run_lineside, test_metrics  # noqa: E402  (bench/_runs.py)


def _teacher_backbone(teacher: Path, out: Path) -> Path:
    """The teacher's image backbone weights (timm keys) as a file for ``ImageEncoder(weights_path=...)``."""
    import torch

    from lineside.fusion.checkpoint_file import read_checkpoint

    prefix = "model.image_encoder.backbone."
    state = {k[len(prefix):]: v for k, v in read_checkpoint(teacher, "cpu")["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"{teacher}: no image backbone weights (an ensemble? give a single-model teacher for --init-from-teacher)")
    path = out / "teacher_backbone.pt"
    torch.save(state, path)
    return path


def _ort_row(path: Path) -> dict:
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        if r["backend"].startswith("onnxruntime"):
            if r.get("error"):
                raise SystemExit(f"{path}: onnxruntime row failed: {r['error']}")
            return r
    raise SystemExit(f"{path}: no onnxruntime row")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/quickstart/checkpoints/best.ckpt")
    p.add_argument("--teacher-config", default="configs/quickstart.yaml", help="config the teacher was trained with (its data split)")
    p.add_argument("--student-config", default="configs/elpv_student.yaml")
    p.add_argument("--out", default="runs/distill_elpv")
    p.add_argument("--skip-fit", action="store_true", help="reuse OUT/<student-name>")
    p.add_argument("--student-name", default="student", help="run folder of the student under OUT")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start the student's backbone from the teacher's (same timm backbone, ELPV-tuned) instead of ImageNet")
    p.add_argument("--reuse-teacher-test", action="store_true", help="take the teacher's test metrics from OUT/teacher_test")
    p.add_argument("--input-size", default="300x300", help="frame size for lineside bench (ELPV cells are 300x300)")
    p.add_argument("--batch-size", default="32", help="batch of the throughput column")
    a = p.parse_args()
    out = (REPO / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = (REPO / a.teacher).resolve()
    if not teacher.is_file():
        raise SystemExit(f"teacher checkpoint {teacher} not found: train it first (lineside fit --config {a.teacher_config})")
    student_run = out / a.student_name
    fit_s = None
    if not a.skip_fit:
        extra = []
        if a.init_from_teacher:
            extra = ["--model.model.init_args.image_encoder.init_args.weights_path", str(_teacher_backbone(teacher, out))]
        print(f"fit: {a.student_name} …", flush=True)
        fit_s = run_lineside(["fit", "--config", a.student_config, "--trainer.default_root_dir", str(student_run), "--overwrite", "true",
                           "--model.distill.teacher", str(teacher), *extra], out / f"{a.student_name}_fit.log")
    student = student_run / "checkpoints" / "best.ckpt"
    results = {}
    for name, config, ckpt in (("teacher", a.teacher_config, teacher), (a.student_name, a.student_config, student)):
        if not (name == "teacher" and a.reuse_teacher_test):
            print(f"test: {name} …", flush=True)
            run_lineside(["test", "--config", config, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(out / f"{name}_test")],
                      out / f"{name}_test.log")
        m = test_metrics(out / f"{name}_test")
        print(f"bench: {name} …", flush=True)
        run_lineside(["bench", "--model", str(ckpt), "--only", "onnxruntime fp32", "--input-size", a.input_size,
                   "--batch-size", a.batch_size, "--json", str(out / f"{name}_bench.json")], out / f"{name}_bench.log")
        ort = _ort_row(out / f"{name}_bench.json")
        results[name] = {"checkpoint": str(ckpt), "acc": m["test/acc"], "macro_f1": m["test/macro_f1"],
                         "auroc": m.get("test/auroc_defective"), "ort_p50_ms": ort["p50_ms"], "ort_throughput": ort["throughput"]}
    t, s = results["teacher"], results[a.student_name]
    print("\nELPV module-block test split; ONNX Runtime fp32 on CPU, frames", a.input_size)
    print("| model | acc | macro-F1 | AUROC (defective) | ORT p50 batch 1 | ORT throughput (batch", a.batch_size + ") |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['acc']:.3f} | {r['macro_f1']:.3f} | {r['auroc']:.3f} | {r['ort_p50_ms']:.2f} ms | {r['ort_throughput']:.0f} img/s |")
    speed = s["ort_throughput"] / t["ort_throughput"]
    latency = t["ort_p50_ms"] / s["ort_p50_ms"]
    print(f"\nstudent vs teacher: throughput ×{speed:.2f}, batch-1 latency ×{latency:.2f} faster, "
          f"accuracy {100 * (s['acc'] - t['acc']):+.1f} points, macro-F1 {100 * (s['macro_f1'] - t['macro_f1']):+.1f} points"
          + (f"; student fit {fit_s:.0f} s" if fit_s else ""))
    (out / f"results_{a.student_name}.json").write_text(json.dumps({"results": results, "throughput_ratio": speed, "latency_ratio": latency,
                                                  "fit_s": fit_s, "args": vars(a)}, indent=2))
    print(f"written {out / f'results_{a.student_name}.json'}")


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
