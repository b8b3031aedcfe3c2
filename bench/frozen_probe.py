"""How far do frozen ImageNet features go on ELPV grades? A screen for backbones and inputs in minutes.

    python bench/frozen_probe.py                                   # lite0, 300 px, levels 2-4
    python bench/frozen_probe.py --run runs/el_grading_cv          # and beside the trained grader
    python bench/frozen_probe.py --backbone tf_efficientnet_lite2 --image-size 260   # a larger packaged backbone
    python bench/frozen_probe.py --weights backbone.pt             # other backbone weights (timm key names)

The backbone stays frozen (ImageNet weights, offline: EfficientNet-Lite0/1/2 from their
packages); each cell becomes the mean, max and root-mean-square of every chosen feature level
(plus its cell type), and a multinomial logistic regression (L2, standardised features) grades it. Same module-block folds as ``crossval.py``:
each of the 2,100 train + val cells is graded by the regression fitted on the other four folds
(out-of-fold); the test blocks by the one fitted on all five, printed for the record only.

Use it to screen a backbone, an image size or an input transform in 1–5 minutes before a fine-tuning
cross-validation (20–50 minutes on 2 cores): what the frozen features cannot separate, fine-tuning has to learn.
With ``--run`` the fine-tuned grader's out-of-fold predictions of the same cells are printed
beside it, and the mean of both probabilities (does the probe add anything?).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lineside.fusion.crossval import _fmt, _load_run  # noqa: E402
from lineside.fusion.ensemble import grade_metrics  # noqa: E402
from lineside.vision.elpv import elpv_block_folds  # noqa: E402
from lineside.vision.image_encoder import ImageEncoder  # noqa: E402
from lineside.vision.patch_memory_scoring import image_batches  # noqa: E402
from lineside.vision.pretrained import PretrainedWeightsError  # noqa: E402


@torch.inference_mode()
def pooled_features(
    paths: list[str], backbone: str, levels: list[int], image_size: int, batch_size: int = 32, weights: str | None = None
) -> np.ndarray:
    """(N, 3 * sum(channels) ) mean / max / RMS of each frozen feature level per image."""
    from tqdm import tqdm

    try:
        enc = ImageEncoder(backbone, embed_dim=1, in_chans=1, feature_levels=levels, pretrained=True, weights_path=weights).eval()
    except PretrainedWeightsError as exc:
        raise SystemExit(f"frozen_probe: {exc}") from None
    if enc.weights_source == "random":  # a probe of random features measures nothing
        raise SystemExit(f"frozen_probe: no offline weights for {backbone!r}; pass --weights FILE (timm key names)")
    out = []
    for images, errors, _ in tqdm(image_batches(paths, 1, image_size, batch_size), total=math.ceil(len(paths) / batch_size), desc="frozen features"):
        if any(errors):
            raise SystemExit("; ".join(e for e in errors if e))
        feats = enc.backbone(enc.normalize(images.float()))  # image_batches already resized them
        out.append(torch.cat([torch.cat([f.mean((2, 3)), f.amax((2, 3)), f.pow(2).mean((2, 3)).sqrt()], 1) for f in feats], 1).float())
    return torch.cat(out).numpy()


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, balanced: bool, steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L-BFGS) on standardised ``x``; returns (mean, std, W, b)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.from_numpy((x - mu) / sd).double(), torch.from_numpy(y).long()
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weight = torch.from_numpy(len(y) / (num_classes * np.maximum(counts, 1))) if balanced else None
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt, weight=weight) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach().numpy(), b.detach().numpy()


def predict_probe(x: np.ndarray, probe: tuple) -> np.ndarray:
    mu, sd, w, b = probe
    return torch.from_numpy(((x - mu) / sd) @ w + b).softmax(1).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", help="backbone weights file (timm key names) instead of the packaged ImageNet weights")
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4], help="backbone feature levels pooled per cell")
    ap.add_argument("--image-size", type=int, default=300)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2", type=float, default=0.05, help="L2 penalty on the weights (per mean loss)")
    ap.add_argument("--balanced", action="store_true", help="weight the loss by inverse grade frequency")
    ap.add_argument("--run", help="a finished crossval.py folder on the same folds, printed beside the probe")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)

    records, order, group = elpv_block_folds(a.folds, seed=a.seed)
    paths = [records[i].path for i in order]
    y = np.array([records[i].label for i in order])
    mono = np.array([[records[i].text == "monocrystalline"] for i in order], dtype=np.float32)
    t0 = time.perf_counter()
    x = np.hstack([pooled_features(paths, a.backbone, a.levels, a.image_size, weights=a.weights), mono])
    t_feat = time.perf_counter() - t0

    probs = np.zeros((len(y), 4))
    for k in [*range(a.folds), -1]:
        train = (group != k) & (group >= 0) if k >= 0 else group >= 0
        probs[group == k] = predict_probe(x[group == k], fit_probe(x[train], y[train], 4, a.l2, a.balanced))
    oof, test = group >= 0, group < 0

    print(f"\nfrozen {a.backbone} ({a.weights or 'ImageNet'}) levels {a.levels} at {a.image_size} px, {x.shape[1]} features, logistic regression "
          f"(l2 {a.l2}{', balanced' if a.balanced else ''}); features {t_feat / 60:.1f} min\n")  # fmt: skip
    print("| model | n | acc % | macro-F1 | AUROC ok vs defective | recall ok / mild / moderate / severe % |\n|---|---|---|---|---|---|")
    print(_fmt("frozen probe, out-of-fold", grade_metrics(probs[oof], y[oof])))
    per = ", ".join(f"{100 * grade_metrics(probs[group == k], y[group == k])['acc']:.1f}" for k in range(a.folds))
    if a.run:
        sys.path.insert(0, str(REPO / "bench"))
        from anomaly_fusion import _align  # noqa: PLC0415

        run = _load_run(Path(a.run), a.folds)
        names = np.array(paths)
        grader = _align(run, names[oof], "oof")
        print(_fmt("fine-tuned grader (--run), out-of-fold", grade_metrics(grader, y[oof])))
        print(_fmt("mean of both, out-of-fold", grade_metrics(0.5 * (grader + probs[oof]), y[oof])))
    print(_fmt("frozen probe, test blocks (record only)", grade_metrics(probs[test], y[test])))
    print(f"\nout-of-fold accuracy per fold: {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
