"""Batch scoring end to end: eager PyTorch vs the exported ONNX graph, and each vs its forward pass alone.

    python bench/score_throughput.py [--ckpt CKPT] [--images 512] [--batch-size 32] [--image-size 224]

End-to-end = ``lineside score`` (``export.score.score``) on real ELPV cell files: decoding,
resizing, the model, CSV rows with fsync per batch and the progress bar, once through eager
torch (``--backend torch``, what ``score`` ran before it took exported graphs) and once through
the default path (``--backend auto``: the checkpoint's ONNX export in ONNX Runtime). Forward-only
= the same backend on the same frames already decoded in memory, at the same batch size. All
measured in one run, interleaved, on the same images.

Without --ckpt the model is built from configs/el_grading.yaml (ImageNet-initialised):
throughput does not depend on trained weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lineside.runtime import TorchBackend, load_backend  # noqa: E402
from lineside.export.checkpoint import LoadedModel, instantiate_config, load_inspection_model  # noqa: E402
from lineside.export.deployable import build_deployable  # noqa: E402
from lineside.export.onnx_export import export_onnx  # noqa: E402
from lineside.runtime.score import score  # noqa: E402
from lineside.vision.elpv import ELPV_GRADE_NAMES, elpv_records  # noqa: E402
from lineside.vision.io import read_image  # noqa: E402
from lineside.vision.preprocess import frames_to_batch  # noqa: E402
from lineside.runtime.verify import verify_artefact  # noqa: E402


def _model(ckpt: str | None, image_size: int) -> LoadedModel:
    if ckpt:
        return load_inspection_model(ckpt)
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "el_grading.yaml").read_text())
    model = instantiate_config(cfg["model"]["model"], offline_weights=False).eval()
    return LoadedModel(model, ELPV_GRADE_NAMES, image_size, model.in_chans, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tta", type=int, default=1)
    a = ap.parse_args()

    loaded = _model(a.ckpt, a.image_size)
    paths = [r.path for r in elpv_records()[: a.images]]
    size = (loaded.image_size, loaded.image_size)
    frames = frames_to_batch([read_image(p, loaded.channels) for p in paths], size)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(loaded, Path(tmp) / "onnx", tta_views=a.tta, parity_images=16, verify=verify_artefact).path
        backends = {
            "torch": TorchBackend(deployable=build_deployable(loaded, tta_views=a.tta), loaded=loaded),
            "onnxruntime": load_backend(onnx_path),
        }

        def forward_only(b) -> float:
            t = time.perf_counter()
            for i in range(0, len(frames), a.batch_size):
                b(frames[i : i + a.batch_size])
            return len(frames) / (time.perf_counter() - t)

        def end_to_end(b, tag: str) -> float:
            s = score(b, paths, Path(tmp) / f"{tag}_{time.perf_counter_ns()}.csv", batch_size=a.batch_size, progress=False)
            assert s.scored == len(paths), s
            return len(paths) / s.seconds

        for b in backends.values():
            b.warmup(a.batch_size)
        res = {k: {"fwd": [], "e2e": []} for k in backends}
        for _ in range(2):  # interleaved so drift hits every path equally
            for k, b in backends.items():
                res[k]["fwd"].append(forward_only(b))
                res[k]["e2e"].append(end_to_end(b, k))
        grades = {k: b(frames[:64])["grade"] for k, b in backends.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"images: {len(paths)} ELPV cells (300x300 PNG) -> {loaded.image_size} px, batch {a.batch_size}, tta {a.tta}")
    print("| path | forward-only img/s | end-to-end `lineside score` img/s | end-to-end / forward | end-to-end vs eager torch |")
    print("|---|---|---|---|---|")
    base = float(np.mean(res["torch"]["e2e"]))
    for k, r in res.items():
        f, e = float(np.mean(r["fwd"])), float(np.mean(r["e2e"]))
        print(f"| {k} | {f:.1f} | {e:.1f} | {e / f:.3f} | **{e / base:.2f}x** |")
    print(f"grades identical on the first 64 cells: {bool((grades['torch'] == grades['onnxruntime']).all())}")


if __name__ == "__main__":
    main()
