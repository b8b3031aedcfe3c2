"""The EL dual model's throughput beside the grading-only model, measured in one run on the same frames.

    python bench/el_dual_throughput.py                                  # quickstart grader vs its dual twin
    python bench/el_dual_throughput.py --dual runs/el_dual/checkpoints/best.ckpt --backends eager,onnxruntime

Models (each takes the same uint8 ELPV test-block frames at ``--input-size`` and resizes inside its graph):

- ``grading``: the grading-only checkpoint (``--grader``, default the quickstart model, 160 px);
- ``el dual``: ``--dual`` when given; else the grader's own configuration with the segmentation head of
  ``configs/el_dual.yaml`` added (the image encoder's stride-4/8/16 maps, an FPN decoder to stride 4),
  the grader's trained weights loaded into it; the head's weights do not change the cost. One export
  returns ``grade_probs``, ``grade``, ``grade_heatmap``, ``defect_masks`` and ``defect_heatmap``;
- ``segmentation``: the segmentation-only checkpoint ``--segmenter`` (default ``runs/el_cracks_brief``),
  when it exists.

Per backend (eager torch: the deployable module; ONNX Runtime fp32: its export) the models run in
interleaved rounds (A, B, C, A, B, C …: a machine whose load drifts weighs on each alike) and the table
gives each model's median frames/s and the ratio to the grader. Region boxes of the masks are made on the
host per record (``lineside score``), not in the graph, and are not timed here.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEGMENTATION_HEAD = {
    "class_path": "lineside.fusion.segmentation_head.SegmentationHead",
    "init_args": {"num_classes": 4, "decoder_dim": 64, "class_names": ["dark_area", "crossing", "crack", "busbar"],
                  "structure_classes": ["busbar"], "thin_classes": ["crack"]},
}


def dual_of(grader, dense_levels=(1, 2, 3)):
    """The grader's model with a segmentation head on its encoder's stride-4/8/16 maps (its weights loaded)."""
    from lineside.export.checkpoint import LoadedModel, instantiate_config

    config = copy.deepcopy(grader.config)
    args = config["init_args"]
    args["image_encoder"]["init_args"]["dense_levels"] = list(dense_levels)
    encoder = instantiate_config(args["image_encoder"])
    head = copy.deepcopy(SEGMENTATION_HEAD)
    head["init_args"] |= {"embed_dim": int(encoder.embed_dim), "in_channels": list(encoder.map_channels)}
    args["heads"] = {"segmentation": head}
    model = instantiate_config(config)
    missing, unexpected = model.load_state_dict(grader.model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("heads.segmentation.") for k in missing):
        raise RuntimeError(f"the grader's weights do not fit its dual twin (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return LoadedModel(model.eval(), list(grader.class_names), grader.image_size, grader.channels, grader.tta_views, config,
                       tasks=[*grader.tasks, "segmentation"])


def backends_for(name: str, loaded, kind: str, input_size, workdir: Path):
    from lineside.export.deployable import build_deployable
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime import load_backend
    from lineside.runtime.torch_backend import TorchBackend

    if kind == "eager":
        return TorchBackend(deployable=build_deployable(loaded, input_size), loaded=loaded)
    if kind == "onnxruntime":
        path = export_onnx(loaded, workdir / name.replace(" ", "_"), input_size=input_size, parity_images=0).path
        return load_backend(path, "onnxruntime", "cpu")
    raise SystemExit(f"--backends: unknown backend {kind!r} (eager, onnxruntime)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grader", default=str(REPO / "runs/quickstart/checkpoints/best.ckpt"), help="grading-only checkpoint")
    ap.add_argument("--dual", default=None, help="an EL dual checkpoint (grading + segmentation); default: the grader + a segmentation head")
    ap.add_argument("--segmenter", default=str(REPO / "runs/el_cracks_brief/checkpoints/best.ckpt"),
                    help="segmentation-only checkpoint (left out when absent)")
    ap.add_argument("--input-size", default="300x300", help="HxW of the frames every model takes (ELPV cells are 300x300)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    ap.add_argument("--backends", default="eager,onnxruntime", help="comma-separated: eager, onnxruntime")
    ap.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads (default: theirs)")
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import numpy as np
    import torch

    from lineside.export.calibration import real_images
    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.deployable import parse_size
    from lineside.runtime.bench import _machine, compare_throughput, format_compare

    if a.threads:
        torch.set_num_threads(a.threads)
    size = parse_size(a.input_size)
    grader = load_inspection_model(a.grader)
    models = {"grading": grader, "el dual": load_inspection_model(a.dual) if a.dual else dual_of(grader)}
    if a.segmenter and Path(a.segmenter).is_file():
        models["segmentation"] = load_inspection_model(a.segmenter)
    frames, _ = real_images(None, size, grader.channels, a.batch_size, split="test")
    if len(frames) < a.batch_size:
        frames = np.concatenate([frames] * (a.batch_size // len(frames) + 1))[: a.batch_size]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [k.strip() for k in a.backends.split(",") if k.strip()]:
            backends = {f"{name} ({m.image_size} px)": backends_for(name, m, kind, size, Path(tmp)) for name, m in models.items()}
            rows = compare_throughput(backends, frames, a.rounds)
            ctx = _machine("cpu") | {"input_size": list(size), "batch": len(frames), "rounds": a.rounds, "frames": "ELPV test blocks",
                                     "backend": kind + (f", {a.threads} threads" if a.threads else "")}
            print(format_compare(rows, ctx))
            dual = next(r for r in rows if r.model.startswith("el dual"))
            print(f"\n{kind}: the EL dual model runs at {dual.ratio:.2f}x the grading-only model's throughput "
                  f"({dual.throughput:.1f} vs {rows[0].throughput:.1f} frames/s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
