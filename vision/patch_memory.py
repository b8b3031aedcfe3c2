"""PatchMemory: anomaly scores and heatmaps learned from good parts only.

No defect labels and no training: a frozen ImageNet backbone embeds every patch of a set of
good images into a memory; a patch of a new image that is far from every remembered good patch
is anomalous. The image score is the largest patch distance, the heatmap is the distance per
patch (PatchCore, Roth et al., CVPR 2022, with a seeded random subset of the memory instead of
the greedy coreset). Useful on its own when only good parts are at hand (a new line, a new
product), and as a second opinion beside a trained grader: on ELPV's module-disjoint folds it
ranks defective cells better than the trained grader on the hardest modules (README).

    python -m lineside.vision.patch_memory fit --input good_cells/ --out memory.pt
    python -m lineside.vision.patch_memory score --memory memory.pt --input labelled.csv --good-label ok --output scores.csv
    python -m lineside.vision.patch_memory crossval --folds 5 --out runs/patch_memory/elpv_cv.npz   # built-in ELPV, block folds

The module is a plain ``nn.Module``: ``forward(uint8 images) -> (score, heatmap)``, with the
memory as a buffer; ``save``/``load`` write one self-contained file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.vision.image_encoder import ImageEncoder

__all__ = ["AnomalyOutput", "PatchMemory", "PatchMemoryError"]

log = logging.getLogger("lineside.patch_memory")


class PatchMemoryError(RuntimeError):
    """A memory file is missing, not a lineside memory, or not fitted."""


class AnomalyOutput(NamedTuple):
    """score: (B,) distance of the most anomalous patch; heatmap: (B, h, w) distance per patch."""

    score: Tensor
    heatmap: Tensor


class PatchMemory(nn.Module):
    """Nearest-neighbour memory of good-image patch features.

    Args:
        backbone: timm backbone (frozen) whose features describe the patches.
        in_chans: 1 (EL, X-ray) or 3 (RGB).
        feature_levels: backbone levels concatenated per patch (EfficientNet: 2 = stride 8,
            3 = stride 16); each is smoothed over 3x3 neighbours, deeper levels are upsampled
            to the first level's grid.
        stride: stride of the heatmap grid (a multiple of the first level's stride); coarser
            grids keep the memory small.
        image_size: images are resized to this square side (300 = ELPV's native size: thin
            cracks survive).
        max_patches: memory size; a seeded random subset of all good patches is kept.
        pretrained / weights_path: backbone weights as in :class:`ImageEncoder` (offline).
        seed: seed of the memory subset.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        in_chans: int = 1,
        feature_levels: Sequence[int] = (2, 3),
        stride: int = 16,
        image_size: int = 300,
        max_patches: int = 40000,
        pretrained: bool = True,
        weights_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = {
            "backbone": backbone, "in_chans": in_chans, "feature_levels": list(feature_levels), "stride": stride,
            "image_size": image_size, "max_patches": max_patches, "seed": seed,
        }  # fmt: skip
        # embed_dim=1: the encoder's token projection is not used, only its backbone and normalisation
        self.encoder = ImageEncoder(backbone, embed_dim=1, in_chans=in_chans, feature_levels=feature_levels, pretrained=pretrained, weights_path=weights_path)
        self.encoder.requires_grad_(False).eval()
        strides = self.encoder.strides
        if stride % strides[0]:
            raise ValueError(f"stride {stride} must be a multiple of the first feature level's stride {strides[0]}")
        self.stride, self.image_size, self.max_patches, self.seed = stride, image_size, max_patches, seed
        self.dim = sum(self.encoder.backbone.feature_info.channels())
        self.register_buffer("memory", torch.zeros(0, self.dim))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def train(self, mode: bool = True) -> "PatchMemory":
        super().train(mode)
        self.encoder.eval()  # frozen: batch norms keep their ImageNet statistics
        return self

    @property
    def fitted(self) -> bool:
        return self.memory.shape[0] > 0

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) uint8/float 0..255 → (B, h, w, D) patch features on the ``stride`` grid."""
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        feats = self.encoder.backbone(self.encoder.normalize(x))
        grid = feats[0].shape[-2:]
        parts = [F.avg_pool2d(f.float(), 3, 1, 1) for f in feats]
        parts = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in parts]
        z = torch.cat(parts, 1)
        pool = self.stride // self.encoder.strides[0]
        if pool > 1:
            z = F.avg_pool2d(z, pool, pool)
        return z.permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor], progress: bool = False) -> "PatchMemory":
        """Fill the memory from batches of good images (uint8 (B, C, H, W)); returns self."""
        from tqdm import tqdm

        chunks = [self.embed(b).half() for b in tqdm(batches, desc="memory", unit="batch", disable=not progress)]
        if not chunks:
            raise PatchMemoryError("no good images to fit the memory on")
        return self.fit_features(torch.cat(chunks))

    def fit_features(self, features: Tensor) -> "PatchMemory":
        """Fill the memory from patch features (..., D) of good images (as :meth:`embed` gives)."""
        bank = features.reshape(-1, self.dim)
        if not len(bank):
            raise PatchMemoryError("no good images to fit the memory on")
        if len(bank) > self.max_patches:
            g = torch.Generator().manual_seed(self.seed)
            bank = bank[torch.randperm(len(bank), generator=g)[: self.max_patches]]
        self.memory = bank.float().to(self.memory.device)
        self.threshold = torch.tensor(float("nan"), device=self.memory.device)
        return self

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], quantile: float = 0.99) -> float:
        """Set ``threshold`` to the ``quantile`` of the scores of good images kept out of the memory."""
        scores = [self(b).score for b in batches]
        if not scores:
            raise PatchMemoryError("no held-out good images to calibrate the threshold on")
        self.threshold = torch.quantile(torch.cat(scores).float(), quantile).to(self.memory.device)
        return float(self.threshold)

    def score_features(self, features: Tensor) -> AnomalyOutput:
        """Patch features (B, h, w, D) → score (B,) and heatmap (B, h, w): distance to the nearest good patch."""
        if not self.fitted:
            raise PatchMemoryError("the memory is empty: fit() it on good images first")
        b, h, w, d = features.shape
        q = features.reshape(-1, d).float()
        qq = (q * q).sum(1, keepdim=True)
        best = None
        for m in self.memory.split(8192):  # bounded RAM: (B·h·w) x 8192 distances at a time
            d2 = (qq - 2.0 * q @ m.T + (m * m).sum(1)).amin(1)
            best = d2 if best is None else torch.minimum(best, d2)
        heat = best.clamp_min(0).sqrt().reshape(b, h, w)
        return AnomalyOutput(heat.flatten(1).amax(1), heat)

    def forward(self, images: Tensor) -> AnomalyOutput:
        return self.score_features(self.embed(images))

    def save(self, path: str | os.PathLike) -> Path:
        """Write config, backbone and memory (one self-contained file; no weights needed to load)."""
        if not self.fitted:
            raise PatchMemoryError("refusing to save an empty memory: fit() it first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"lineside_patch_memory": 1, "config": self.config, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "PatchMemory":
        path = Path(path)
        if not path.is_file():
            raise PatchMemoryError(f"{path}: memory file not found")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise PatchMemoryError(f"{path}: not a readable memory file ({exc})") from None
        if not isinstance(obj, dict) or "lineside_patch_memory" not in obj:
            raise PatchMemoryError(f"{path}: not a lineside patch memory (write one with `python -m lineside.vision.patch_memory fit`)")
        model = cls(**obj["config"], pretrained=False)
        model.memory = torch.empty_like(obj["state_dict"]["memory"])
        model.load_state_dict(obj["state_dict"])
        return model.eval()


# ---------------------------------------------------------------------------------------------
# command line: fit on good images, score a folder or manifest, cross-validate on ELPV


def image_batches(paths: Sequence[str], channels: int, size: int, batch_size: int = 32, num_workers: int = 0):
    """Iterate ``(images uint8 (B, C, size, size), errors list[str], paths)``, decoded as score.py does, in workers."""
    from torch.utils.data import DataLoader

    from lineside.vision.image_dataset import ScoringImageDataset

    for b in DataLoader(ScoringImageDataset(paths, size, channels), batch_size=batch_size, num_workers=num_workers):
        yield b["image"], list(b["error"]), list(b["path"])


def _good_only(batches, skipped: list[str]):
    """Images of batches without read errors; the errors are collected in ``skipped``."""
    for images, errors, _ in batches:
        ok = [i for i, e in enumerate(errors) if not e]
        skipped += [e for e in errors if e]
        if ok:
            yield images[ok]


def _auroc(scores: np.ndarray, defective: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    if defective.all() or not defective.any():
        return float("nan")
    # ranks in (0, 1], ties kept: torchmetrics would read scores outside [0, 1] as logits and squash them
    return float(binary_auroc(torch.from_numpy(_rank(np.asarray(scores, dtype=np.float64))).float(), torch.from_numpy(defective.astype(np.int64))))


def _read_inputs(spec: str, good_label: str | None, need_good_label: bool = False) -> tuple[list[str], np.ndarray | None]:
    """Paths of --input and, for a labelled manifest with --good-label, 1 = not good / 0 = good / -1 = unlabelled.

    ``need_good_label``: a manifest with labels but no --good-label is refused (fitting on it would
    put defective parts into the memory of good ones).
    """
    from lineside.vision.records import records_from_manifest

    if spec.lower().endswith(".csv"):
        records, names = records_from_manifest(spec)
        paths = [r.path for r in records]
        if good_label is None:
            if need_good_label and any(r.label >= 0 for r in records):
                raise SystemExit(f"{spec}: the manifest has labels {names}; pass --good-label NAME so only good images enter the memory")
            return paths, None
        if good_label not in names:
            raise SystemExit(f"{spec}: --good-label {good_label!r} is not one of the manifest's labels {names}")
        good = names.index(good_label)
        return paths, np.array([-1 if r.label < 0 else int(r.label != good) for r in records])
    from lineside.vision.io import collect_inputs

    return collect_inputs(spec), None


def _fit_cmd(a: argparse.Namespace) -> int:
    paths, bad = _read_inputs(a.input, a.good_label, need_good_label=True)
    if bad is not None:
        paths = [p for p, b in zip(paths, bad) if b == 0]
    order = np.random.default_rng(a.seed).permutation(len(paths))
    n_cal = int(round(len(paths) * a.calib_fraction))
    if len(paths) - n_cal < 1:
        raise SystemExit(f"{a.input}: {len(paths)} good images are too few for a memory")
    mem_paths, cal_paths = [paths[i] for i in order[n_cal:]], [paths[i] for i in order[:n_cal]]
    model = PatchMemory(in_chans=a.channels, image_size=a.image_size, stride=a.stride, max_patches=a.max_patches, seed=a.seed)
    skipped: list[str] = []
    model.fit(_good_only(image_batches(mem_paths, a.channels, a.image_size, a.batch_size, a.num_workers), skipped), progress=True)
    n_mem = len(mem_paths) - len(skipped)
    if cal_paths:
        thr = model.calibrate(_good_only(image_batches(cal_paths, a.channels, a.image_size, a.batch_size, a.num_workers), skipped), a.quantile)
        print(f"threshold {thr:.4f}: the {a.quantile:.0%} quantile of {len(cal_paths)} held-out good images")
    for e in skipped:
        log.warning("skipped: %s", e)
    out = model.save(a.out)
    print(f"memory of {len(model.memory)} patches from {n_mem} good images ({len(skipped)} unreadable, skipped) → {out}")
    return 0


def heatmap_overlay(image: Tensor, heatmap: Tensor, scale: float) -> "Image.Image":
    """An RGB PIL image: ``image`` (C, H, W uint8) in grey with ``heatmap`` (h, w) in red, full red at ``scale``."""
    from PIL import Image

    grey = image.float().mean(0)
    heat = F.interpolate(heatmap[None, None].float(), size=grey.shape, mode="bilinear", align_corners=False)[0, 0]
    alpha = (heat / max(scale, 1e-6)).clamp(0, 1) * 0.6
    red = torch.tensor([255.0, 30.0, 30.0]).view(3, 1, 1)
    rgb = grey[None] * (1 - alpha) + red * alpha
    return Image.fromarray(rgb.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def _score_cmd(a: argparse.Namespace) -> int:
    import csv

    from tqdm import tqdm

    model = PatchMemory.load(a.memory)
    paths, bad = _read_inputs(a.input, a.good_label)
    thr = float(model.threshold)
    scores = np.full(len(paths), np.nan, dtype=np.float32)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.overlays:
        Path(a.overlays).mkdir(parents=True, exist_ok=True)
    i = 0
    with open(out, "w", newline="", encoding="utf-8") as fh, torch.inference_mode():
        w = csv.writer(fh)
        w.writerow(["path", "anomaly_score", "anomalous", "error"])
        batches = image_batches(paths, model.config["in_chans"], model.image_size, a.batch_size, a.num_workers)
        for images, errors, names in tqdm(batches, total=math.ceil(len(paths) / a.batch_size), desc="scoring", unit="batch"):
            out_b = model(images)
            s = out_b.score.numpy()
            for j, (p, e) in enumerate(zip(names, errors)):
                if not e:
                    scores[i + j] = s[j]
                    if a.overlays:
                        scale = thr if not math.isnan(thr) else float(out_b.score.max())
                        heatmap_overlay(images[j], out_b.heatmap[j], scale).save(Path(a.overlays) / f"{i + j:06d}_{Path(p).stem}.png")
                flag = "" if e or math.isnan(thr) else int(s[j] > thr)
                w.writerow([p, "" if e else f"{s[j]:.5f}", flag, e])
            i += len(names)
            fh.flush()  # finished rows survive a crash
    print(f"wrote {len(paths)} rows ({int(np.isnan(scores).sum())} with errors) to {out}")
    if bad is not None:
        keep = (bad >= 0) & ~np.isnan(scores)
        print(f"AUROC good-vs-not-good {_auroc(scores[keep], bad[keep] == 1):.3f} on {int(keep.sum())} labelled images")
    return 0


def elpv_crossval(
    folds: int = 5, per_text: bool = True, block_size: int = 60, seed: int = 0, batch_size: int = 32, progress: bool = True, **memory_kwargs
) -> dict:
    """Anomaly scores of ELPV on the block folds and test split that ``crossval.py`` uses.

    Out-of-fold: for fold k the memory holds the ok cells of the other folds (one memory per
    cell type when ``per_text``) and scores every cell of fold k. Test: the memory holds all
    ok cells of train + val and scores the test blocks. Patch features are computed once.
    Returns arrays ``oof_paths, oof_labels, oof_fold, oof_scores, test_paths, test_labels, test_scores``.
    """
    from tqdm import tqdm

    from lineside.vision.elpv import elpv_block_folds

    records, order, group = elpv_block_folds(folds, block_size, seed)
    model = PatchMemory(**memory_kwargs).eval()
    paths = [records[i].path for i in order]
    feats = []
    with torch.inference_mode():
        for images, errors, names in tqdm(
            image_batches(paths, 1, model.image_size, batch_size), total=math.ceil(len(paths) / batch_size), desc="patch features", disable=not progress
        ):
            if any(errors):
                raise PatchMemoryError("; ".join(e for e in errors if e))
            feats.append(model.embed(images).half())
    feats_t = torch.cat(feats)
    y = np.array([records[i].label for i in order])
    text = np.array([records[i].text if per_text else "" for i in order])
    scores = np.zeros(len(order), dtype=np.float32)
    with torch.inference_mode():
        for k in [*range(folds), -1]:
            for t in np.unique(text):
                train = (group != k) & (group >= 0) if k >= 0 else group >= 0
                good = np.flatnonzero(train & (y == 0) & (text == t))
                query = np.flatnonzero((group == k) & (text == t))
                if not len(query):
                    continue
                model.fit_features(feats_t[good])
                for s in range(0, len(query), batch_size):
                    scores[query[s : s + batch_size]] = model.score_features(feats_t[query[s : s + batch_size]]).score.numpy()
            if progress:
                v = group == k
                print(f"{'test' if k < 0 else f'fold {k}'}: {int(v.sum())} cells, AUROC ok-vs-defective {_auroc(scores[v], y[v] > 0):.3f}", file=sys.stderr)
    n = int((group >= 0).sum())
    names = np.array(paths)
    return {
        "oof_paths": names[:n], "oof_labels": y[:n], "oof_fold": group[:n], "oof_scores": scores[:n],
        "test_paths": names[n:], "test_labels": y[n:], "test_scores": scores[n:],
    }  # fmt: skip


def _rank(x: np.ndarray) -> np.ndarray:
    """Empirical-CDF rank of each value in (0, 1]; ties share a rank, so AUROC and rank means treat them fairly."""
    x = np.asarray(x, dtype=np.float64)
    return np.searchsorted(np.sort(x), x, side="right") / max(len(x), 1)


def _crossval_cmd(a: argparse.Namespace) -> int:
    r = elpv_crossval(a.folds, not a.pooled_types, seed=a.seed, batch_size=a.batch_size, image_size=a.image_size, stride=a.stride, max_patches=a.max_patches)
    y, s, f = r["oof_labels"] > 0, r["oof_scores"], r["oof_fold"]
    per = " | ".join(f"{_auroc(s[f == k], y[f == k]):.3f}" for k in range(a.folds))
    print(f"\nAUROC ok-vs-defective, ELPV block folds (seed {a.seed}); the test blocks for the record, not for choosing\n")
    print(f"| OOF (n={len(y)}) | " + " | ".join(f"fold {k}" for k in range(a.folds)) + f" | test (n={len(r['test_labels'])}) |")
    print("|---|" + "---|" * a.folds + "---|")
    print(f"| {_auroc(s, y):.3f} | {per} | {_auroc(r['test_scores'], r['test_labels'] > 0):.3f} |")
    if a.out:
        np.savez(a.out, **r)
        print(f"\nscores saved to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="lineside patch-memory", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, fit: bool = False):
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--num-workers", type=int, default=min(2, os.cpu_count() or 1))
        if fit:
            p.add_argument("--image-size", type=int, default=300)
            p.add_argument("--stride", type=int, default=16)
            p.add_argument("--max-patches", type=int, default=40000)
            p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("fit", help="build a memory from good images (folder, glob or CSV manifest)")
    p.add_argument("--input", required=True)
    p.add_argument("--good-label", default=None, help="with a labelled CSV: the class name of good images (others are left out)")
    p.add_argument("--out", required=True)
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--calib-fraction", type=float, default=0.1, help="good images kept out of the memory to set the threshold")
    p.add_argument("--quantile", type=float, default=0.99)
    common(p, fit=True)
    p.set_defaults(fn=_fit_cmd)

    p = sub.add_parser("score", help="anomaly score per image → CSV (AUROC too, for a labelled CSV with --good-label)")
    p.add_argument("--memory", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--good-label", default=None)
    p.add_argument("--overlays", default=None, help="folder for PNGs of each image with its heatmap in red (full red = threshold)")
    common(p)
    p.set_defaults(fn=_score_cmd)

    p = sub.add_parser("crossval", help="out-of-fold AUROC on the built-in ELPV block folds")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--pooled-types", action="store_true", help="one memory for mono and poly cells instead of one per type")
    p.add_argument("--out", default=None, help="save all scores to this .npz (bench/anomaly_fusion.py compares them with a grader)")
    common(p, fit=True)
    p.set_defaults(fn=_crossval_cmd)

    a = ap.parse_args(argv)
    from lineside.vision.io import InputError
    from lineside.vision.records import DatasetFormatError

    try:
        return a.fn(a)
    except (PatchMemoryError, InputError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
