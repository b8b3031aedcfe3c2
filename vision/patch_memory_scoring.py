"""Scoring with a :class:`~lineside.vision.patch_memory.PatchMemory`: image batches, fitting and
scoring files, heatmap overlays and the AUROC of anomaly scores.

    batches = image_batches(paths, channels=1, size=300)
    fit = fit_memory(good_paths, channels=1, calib_fraction=0.1)        # memory + threshold
    scores = score_to_csv(fit.model, paths, "scores.csv", overlays="heat/")
    anomaly_auroc(scores[labelled], defective[labelled])                # ranks: distances are not logits
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lineside.vision.patch_memory import PatchMemory, PatchMemoryError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MemoryFit", "anomaly_auroc", "empirical_rank", "fit_memory", "good_only", "heatmap_overlay", "image_batches", "score_to_csv"]

log = logging.getLogger("lineside.patch_memory")


def image_batches(paths: Sequence[str], channels: int, size: int, batch_size: int = 32,
                  num_workers: int = 0) -> Iterator[tuple[Tensor, list[str], list[str]]]:
    """Iterate ``(images uint8 (B, C, size, size), errors list[str], paths)``, decoded as ``lineside score`` does, in workers."""
    from torch.utils.data import DataLoader

    from lineside.vision.image_dataset import ScoringImageDataset

    for b in DataLoader(ScoringImageDataset(paths, size, channels), batch_size=batch_size, num_workers=num_workers):
        yield b["image"], list(b["error"]), list(b["path"])


def good_only(batches: Iterable[tuple[Tensor, list[str], list[str]]], skipped: list[str]) -> Iterator[Tensor]:
    """Images of ``image_batches`` without read errors; the errors are appended to ``skipped``."""
    for images, errors, _ in batches:
        ok = [i for i, e in enumerate(errors) if not e]
        skipped += [e for e in errors if e]
        if ok:
            yield images[ok]


def empirical_rank(x: np.ndarray) -> np.ndarray:
    """Empirical-CDF rank of each value in (0, 1]; ties share a rank, so AUROC and rank means treat them fairly."""
    x = np.asarray(x, dtype=np.float64)
    return np.searchsorted(np.sort(x), x, side="right") / max(len(x), 1)


def anomaly_auroc(scores: np.ndarray, defective: np.ndarray) -> float:
    """AUROC of anomaly scores (any scale) for ``defective`` (bool); NaN when only one class is present."""
    from torchmetrics.functional.classification import binary_auroc

    defective = np.asarray(defective, dtype=bool)
    if defective.all() or not defective.any():
        return float("nan")
    # ranks in (0, 1], ties kept: torchmetrics would read scores outside [0, 1] as logits and squash them
    ranks = torch.from_numpy(empirical_rank(scores)).float()
    return float(binary_auroc(ranks, torch.from_numpy(defective.astype(np.int64))))


def heatmap_overlay(image: Tensor, heatmap: Tensor, scale: float) -> "Image.Image":
    """An RGB PIL image: ``image`` (C, H, W uint8) in grey with ``heatmap`` (h, w) in red, full red at ``scale``."""
    from PIL import Image

    grey = image.float().mean(0)
    heat = F.interpolate(heatmap[None, None].float(), size=grey.shape, mode="bilinear", align_corners=False)[0, 0]
    alpha = (heat / max(scale, 1e-6)).clamp(0, 1) * 0.6
    red = torch.tensor([255.0, 30.0, 30.0]).view(3, 1, 1)
    rgb = grey[None] * (1 - alpha) + red * alpha
    return Image.fromarray(rgb.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


@dataclass
class MemoryFit:
    """A fitted memory and what went into it: good images in the memory, held out for the threshold, unreadable."""

    model: PatchMemory
    n_memory: int
    n_calibration: int
    threshold: float
    skipped: list[str] = field(default_factory=list)


def fit_memory(paths: Sequence[str], channels: int = 1, calib_fraction: float = 0.1, quantile: float = 0.99, batch_size: int = 32,
               num_workers: int = 0, progress: bool = True, **memory_kwargs) -> MemoryFit:
    """Fill a :class:`PatchMemory` from good images and set its threshold on ``calib_fraction`` of them kept out.

    ``memory_kwargs`` go to :class:`PatchMemory` (``image_size``, ``stride``, ``max_patches``, ``seed`` …); the
    seed also picks the held-out images. Unreadable files are skipped and listed in ``skipped``.
    """
    model = PatchMemory(in_chans=channels, **memory_kwargs)
    order = np.random.default_rng(model.seed).permutation(len(paths))
    n_cal = int(round(len(paths) * calib_fraction))
    if len(paths) - n_cal < 1:
        raise PatchMemoryError(f"{len(paths)} good images are too few for a memory")
    mem_paths, cal_paths = [paths[i] for i in order[n_cal:]], [paths[i] for i in order[:n_cal]]
    skipped: list[str] = []
    model.fit(good_only(image_batches(mem_paths, channels, model.image_size, batch_size, num_workers), skipped), progress=progress)
    n_mem = len(mem_paths) - len(skipped)
    thr = float("nan")
    if cal_paths:
        thr = model.calibrate(good_only(image_batches(cal_paths, channels, model.image_size, batch_size, num_workers), skipped), quantile)
    for e in skipped:
        log.warning("skipped: %s", e)
    return MemoryFit(model, n_mem, len(cal_paths), thr, skipped)


def score_to_csv(model: PatchMemory, paths: Sequence[str], output: str | os.PathLike, overlays: str | os.PathLike | None = None,
                 batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """Score every path into a ``path,anomaly_score,anomalous,error`` CSV; returns the scores (NaN for unreadable files).

    ``anomalous`` is 1 above the memory's threshold (empty without one). With ``overlays`` each
    readable image is saved with its heatmap in red (full red = threshold). Rows are flushed per batch.
    """
    from tqdm import tqdm

    thr = float(model.threshold)
    scores = np.full(len(paths), np.nan, dtype=np.float32)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if overlays:
        Path(overlays).mkdir(parents=True, exist_ok=True)
    i = 0
    with open(out, "w", newline="", encoding="utf-8") as fh, torch.inference_mode():
        w = csv.writer(fh)
        w.writerow(["path", "anomaly_score", "anomalous", "error"])
        batches = image_batches(paths, model.config["in_chans"], model.image_size, batch_size, num_workers)
        for images, errors, names in tqdm(batches, total=math.ceil(len(paths) / batch_size), desc="scoring", unit="batch", disable=not progress):
            out_b = model(images)
            s = out_b.score.numpy()
            for j, (p, e) in enumerate(zip(names, errors)):
                if not e:
                    scores[i + j] = s[j]
                    if overlays:
                        scale = thr if not math.isnan(thr) else float(out_b.score.max())
                        heatmap_overlay(images[j], out_b.heatmap[j], scale).save(Path(overlays) / f"{i + j:06d}_{Path(p).stem}.png")
                flag = "" if e or math.isnan(thr) else int(s[j] > thr)
                w.writerow([p, "" if e else f"{s[j]:.5f}", flag, e])
            i += len(names)
            fh.flush()  # finished rows survive a crash
    return scores
