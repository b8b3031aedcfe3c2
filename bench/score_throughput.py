"""End-to-end batch scoring vs forward-only throughput, measured in one run on the same images.

    python bench/score_throughput.py [--ckpt CKPT] [--images 512] [--batch-size 32] [--image-size 224]

End-to-end = ``score.score()`` on real ELPV cell files: decoding, resizing, the model, CSV
writing (fsync per batch) and the progress bar. Forward-only = the same model on the same images,
already decoded and resized in memory, at the same batch size. The ratio says how much of the
scoring pipeline hides behind compute (goal: >= 0.9).

Without --ckpt the model is built from configs/el_grading.yaml (ImageNet-initialised): throughput
does not depend on trained weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from lineside.export.checkpoint import LoadedModel, instantiate_config, load_inspection_model  # noqa: E402
from lineside.fusion.postprocess import predict_grades  # noqa: E402
from lineside.export.score import score  # noqa: E402
from lineside.vision.elpv import ELPV_GRADE_NAMES, elpv_records  # noqa: E402
from lineside.vision.io import read_image  # noqa: E402
from lineside.vision.transforms import build_eval_transform  # noqa: E402


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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tta", type=int, default=1)
    a = ap.parse_args()

    loaded = _model(a.ckpt, a.image_size)
    loaded.model.to(a.device)
    paths = [r.path for r in elpv_records()[: a.images]]

    tf = build_eval_transform(loaded.image_size)
    batches = []
    for i in range(0, len(paths), a.batch_size):
        batches.append(torch.stack([tf(image=read_image(p, loaded.channels))["image"] for p in paths[i : i + a.batch_size]]))

    def forward_only() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                predict_grades(loaded.model, b.to(a.device), a.tta).probs.cpu()
        return len(paths) / (time.perf_counter() - t)

    def end_to_end() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            s = score(loaded, paths, Path(tmp) / "r.csv", batch_size=a.batch_size, device=a.device, tta_views=a.tta, progress=False)
            assert s.scored == len(paths), s
            return len(paths) / s.seconds

    with torch.inference_mode():  # warm-up (oneDNN primitive caches)
        predict_grades(loaded.model, batches[0].to(a.device), a.tta)
    fwd1, e2e1 = forward_only(), end_to_end()  # interleaved twice so drift hits both equally
    e2e2, fwd2 = end_to_end(), forward_only()
    fwd, e2e = (fwd1 + fwd2) / 2, (e2e1 + e2e2) / 2
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {a.device}")
    print(f"images: {len(paths)} ELPV cells (300x300 PNG) -> {loaded.image_size} px, batch {a.batch_size}, tta {a.tta}")
    print(f"forward-only : {fwd:8.1f} img/s")
    print(f"end-to-end   : {e2e:8.1f} img/s  (score.py: decode + resize + model + CSV with fsync)")
    print(f"ratio end-to-end / forward-only: {e2e / fwd:.3f}")


if __name__ == "__main__":
    main()
