"""``lineside score``: batch offline scoring of a folder, glob or CSV manifest (:func:`lineside.runtime.score.score`).

    lineside score --model runs/el_grading/checkpoints/best.ckpt --input /data/cells --output results.csv
    lineside score --model export/quickstart/model.onnx --input "lines/*/cam0/*.png" --output results.parquet --overlays ov/
    lineside score --model export/quickstart/model.onnx --input /data/cells --output results.parquet --engine ray --actors 4

A CSV manifest with a ``label`` column is also an evaluation set: accuracy, macro-F1, per-grade
recall, the confusion matrix and AUROC ok-vs-defective are printed and written beside the results.
``--engine ray`` scores on a Ray cluster with the same rows (:mod:`lineside.runtime.ray_score`, docs/plant.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lineside.cli.common import (
    add_backend_arg,
    add_batch_size_arg,
    add_device_arg,
    add_model_arg,
    add_out_arg,
    add_adapter_arg,
    add_trust_checkpoint_arg,
)
from lineside.fusion.ensemble import format_confusion
from lineside.runtime.detections import BOX_SCORE_THRESHOLD
from lineside.runtime.module_score import grid_arg
from lineside.runtime.score import evaluate_scores, manifest_labels, open_model, score
from lineside.vision.io import InputError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside score", description="Score images with a lineside model; resumable, one row per input.")
    add_model_arg(ap, help="checkpoint (lineside fit / crossval's ensemble.ckpt) or exported artefact (.onnx, .pt2, .engine, "
                  "export folder), or a grasp ranker file (GraspRanker.save) for point clouds")
    ap.add_argument("--input", required=True, help="folder (recursive), glob (quote it) or CSV manifest with a 'path' column (and 'label' to evaluate)")
    add_out_arg(ap, help="results .csv or .parquet (resumed if it exists)")
    ap.add_argument("--overlays", default=None, help="folder for PNG overlays (image with the heatmap blended in, or a segmentation model's defect classes in colour, boxes, grade and confidence)")
    ap.add_argument("--box-threshold", type=float, default=BOX_SCORE_THRESHOLD,
                    help=f"models with a localization head: boxes scoring at least this go to the boxes column and overlays (default {BOX_SCORE_THRESHOLD})")
    ap.add_argument("--heatmaps", default=None, help="folder for one defect-heatmap PNG per image (image size, 0..255 = 0..1); "
                    "adds a heatmap column with its path")
    ap.add_argument("--masks", default=None, help="segmentation models: folder for one class-index PNG per image (image size, "
                    "0 background, k = class k) and classes.json (index → name); adds a mask column with its path")
    add_batch_size_arg(ap)
    add_device_arg(ap)
    ap.add_argument("--num-workers", type=int, default=None, help="decoding threads (default: cores, at most 4; 0 = decode in the main thread)")
    ap.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8], help="dihedral test-time views (checkpoints; default: as trained)")
    add_backend_arg(ap)
    ap.add_argument("--input-size", default=None, help="checkpoints: HxW of the frames the model takes (default: the training size)")
    ap.add_argument("--text", default=None, help="checkpoints with a text encoder: one prompt for every image (cell type, product …)")
    ap.add_argument("--intrinsics", default=None, help="point models: pinhole intrinsics JSON for depth-image inputs "
                    "(default: <stem>.json or intrinsics.json beside each image)")
    ap.add_argument("--retry-errors", action="store_true", help="on resume, score again the rows that had errors")
    ap.add_argument("--tile", default=None, choices=["cells"], help="cells: inputs are whole-module EL images; find the cell "
                    "grid, score the cells as one batch, one row per module with a per-cell grid (see docs/modules.md)")
    ap.add_argument("--grid", default=None, type=grid_arg, metavar="ROWSxCOLS", help="with --tile cells: the module's cell grid, e.g. 6x10 "
                    "(either orientation; default: found in each image)")
    ap.add_argument("--no-progress", action="store_true")
    add_trust_checkpoint_arg(ap)
    add_adapter_arg(ap)
    ray = ap.add_argument_group("Ray (--engine ray: the same rows, scored on a Ray cluster; see docs/plant.md)")
    ray.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="local (default): this process; ray: a Ray Dataset of paths, decoding tasks and a pool of model actors")
    ray.add_argument("--address", default=None, help="Ray cluster to join: auto, ray://host:10001 (default: start a local Ray instance)")
    ray.add_argument("--actors", type=int, default=1, help="model actors, each holding the model once (default 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (the model then runs on cuda; default 0: CPUs)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor, also its ONNX Runtime / torch threads (default 1)")
    return ap


def _score_on_ray(a: argparse.Namespace) -> tuple:
    """``--engine ray``: the summary, and the grade names read back from the results' ``p_<grade>`` columns."""
    from lineside.runtime.ray_score import score_on_ray

    unsupported = [flag for flag, value in (("--overlays", a.overlays), ("--heatmaps", a.heatmaps), ("--masks", a.masks),
                                            ("--intrinsics", a.intrinsics), ("--tile", a.tile)) if value]
    if a.adapter:
        raise InputError("--adapter: with --engine ray pass the adapter file as --model (it names its base model), "
                         "or export the merged model first (lineside export onnx --adapter)")
    if unsupported:
        raise InputError(f"{', '.join(unsupported)}: not available with --engine ray (it writes result rows only); "
                         "score without --engine ray for overlays, heatmaps, masks and point clouds")
    s = score_on_ray(a.model, a.input, a.out, address=a.address, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
                     cpus_per_actor=a.cpus_per_actor, batch_size=a.batch_size, backend=a.backend, input_size=a.input_size,
                     tta_views=a.tta, text=a.text, box_threshold=a.box_threshold, retry_errors=a.retry_errors,
                     progress=not a.no_progress, trust_checkpoint=a.trust_checkpoint)
    if str(a.out).lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        columns = pq.read_schema(a.out).names
    else:
        import csv

        with open(a.out, newline="", encoding="utf-8") as fh:
            columns = next(csv.reader(fh), [])
    # the plain grade's p_<grade> columns follow "confidence"; named tasks' p_<task>_<grade> come later
    names: list[str] = []
    for c in columns[columns.index("confidence") + 1:] if "confidence" in columns else []:
        if not c.startswith("p_"):
            break
        names.append(c[2:])
    return s, names


def _print_metrics(m: dict) -> None:
    names = m["class_names"]
    print(f"labelled {m['n']}: acc {100 * m['acc']:.1f}%  macro-F1 {m['macro_f1']:.3f}  AUROC ok-vs-defective {m['auroc_defective']:.3f}")
    print("recall: " + "  ".join(f"{n} {100 * r:.1f}%" for n, r in zip(names, m["recall"])))
    print(format_confusion(names, m["confusion"]))
    if m["missing_or_failed"]:
        print(f"({m['missing_or_failed']} labelled inputs failed or were not scored and are left out)")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim"):  # a checkpoint's one-off ONNX export: its summary only
        logging.getLogger(noisy).setLevel(logging.WARNING)
    labelled = os.path.isfile(a.input) and a.input.lower().endswith(".csv") and not a.tile  # module rows carry no cell labels
    if a.engine == "ray":
        try:
            s, class_names = _score_on_ray(a)
        except (InputError, RuntimeError, FileNotFoundError, ValueError, ImportError) as exc:
            print(f"lineside score: error: {exc}", file=sys.stderr)
            return 2
        print(f"scored {s.scored}, errors {s.errors}, skipped (already done) {s.skipped} of {s.total} inputs "
              f"in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s, {s.backend}) → {s.output}")
        metrics = evaluate_scores(a.out, a.input, class_names) if labelled and class_names else None
        if metrics:
            _print_metrics(metrics)
        return 0
    try:
        runner = open_model(a.model, a.backend, a.device, a.input_size, a.tta, a.text, trust_checkpoint=a.trust_checkpoint,
                            adapter=a.adapter)
        labelled = labelled and "grade_probs" in runner.output_names  # boxes-only models: no grade metrics
        if labelled:  # bad labels are reported before any scoring
            labelled = manifest_labels(Path(a.input), runner.class_names) is not None
        s = score(runner, a.input, a.out, a.overlays, a.batch_size, a.device, a.num_workers, None, a.retry_errors, not a.no_progress,
                  box_threshold=a.box_threshold, heatmaps=a.heatmaps, intrinsics=a.intrinsics, masks=a.masks, tile=a.tile, grid=a.grid)
    except (InputError, RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"lineside score: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"scored {s.scored}, errors {s.errors}, skipped (already done) {s.skipped} of {s.total} inputs "
        f"in {s.seconds:.1f} s ({s.images_per_second:.1f} {'modules' if a.tile else 'img'}/s, {s.backend}) → {s.output}"
    )
    metrics = evaluate_scores(a.out, a.input, runner.class_names) if labelled else None
    if metrics:
        _print_metrics(metrics)
    return 0
