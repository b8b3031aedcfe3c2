"""Detection metrics on decoded boxes and defect heatmaps (torchmetrics underneath).

- :class:`BoxMeanAP`: COCO mAP@0.5, mAP@0.5:0.95 and per-class AP of decoded top-K boxes
  (:class:`lineside.fusion.box_decoder.BoxDecoder` outputs) against padded batch targets, via
  torchmetrics ``MeanAveragePrecision`` (backend ``faster_coco_eval`` or ``pycocotools``,
  whichever is installed);
- :class:`PixelAUROC`: pixel-level AUROC of the defect heatmap against masks (torchmetrics
  ``BinaryAUROC`` on a seeded subsample of the pixels of samples that have a mask), and beside
  it the per-region overlap (:class:`PerRegionOverlap`, PRO as in MVTec AD) on all pixels.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["BoxMeanAP", "PerRegionOverlap", "PixelAUROC", "coco_backend"]


def coco_backend() -> str:
    """``"faster_coco_eval"`` or ``"pycocotools"`` (the first installed); an error naming both otherwise."""
    for name, module in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise ModuleNotFoundError("box mAP needs a COCO evaluation backend: pip install faster-coco-eval (or pycocotools)")


class BoxMeanAP(nn.Module):
    """COCO box mAP of decoded detections against padded targets.

    Args:
        class_names: names of the C defect classes (keys of the per-class results).
        score_threshold: predictions scoring below it are ignored (0 keeps all K).
        max_detections: COCO's max detections per image (≥ the decoder's K keeps them all).
        backend: ``"faster_coco_eval"`` / ``"pycocotools"``; default the installed one.
        extra_iou_thresholds: more single-threshold APs, each as ``map_<100·t>`` (e.g. 0.33 → ``map_33``, the
            DeepPCB benchmark's own criterion: a detection counts at IoU > 0.33) with ``ap_<100·t>/<class>``.

    Shapes:
        update: boxes (N, K, 4) xyxy, box_scores (N, K), box_labels (N, K) from the decoder;
        target_boxes (N, M, 4) xyxy in the same pixels, target_labels (N, M), target_box_mask
        (N, M) bool (padding False). Samples in ``keep`` (N,) bool only, when given.
        compute: → dict with ``map_50``, ``map`` (0.5:0.95), ``map_75``, ``mar_100`` (floats) and
        ``ap_50/<class>``, ``ap/<class>`` for each class present in predictions or targets
        (-1 where a class has no targets).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        score_threshold: float = 0.0,
        max_detections: int = 100,
        backend: str | None = None,
        extra_iou_thresholds: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.score_threshold = score_threshold
        self.metric = MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            max_detection_thresholds=[1, 10, max_detections],
            class_metrics=True,
            extended_summary=True,
            backend=backend or coco_backend(),
        )
        self.extra = nn.ModuleDict()
        for t in extra_iou_thresholds:
            if not 0.0 < float(t) < 1.0:
                raise ValueError(f"extra_iou_thresholds: {t} is not an IoU in (0, 1)")
            self.extra[str(round(float(t) * 100))] = MeanAveragePrecision(
                box_format="xyxy",
                iou_type="bbox",
                iou_thresholds=[float(t)],
                max_detection_thresholds=[1, 10, max_detections],
                class_metrics=True,
                extended_summary=True,
                backend=backend or coco_backend(),
            )
        self.max_detections = max_detections

    def reset(self) -> None:
        self.metric.reset()
        for m in self.extra.values():
            m.reset()

    @torch.no_grad()
    def update(
        self,
        boxes: Tensor,
        box_scores: Tensor,
        box_labels: Tensor,
        target_boxes: Tensor,
        target_labels: Tensor,
        target_box_mask: Tensor,
        keep: Tensor | None = None,
    ) -> None:
        preds, targets = [], []
        for i in range(boxes.shape[0]):
            if keep is not None and not bool(keep[i]):
                continue
            sel = box_scores[i] >= self.score_threshold
            preds.append({"boxes": boxes[i][sel].float().cpu(), "scores": box_scores[i][sel].float().cpu(), "labels": box_labels[i][sel].long().cpu()})
            real = target_box_mask[i].bool() & (target_labels[i] >= 0)
            targets.append({"boxes": target_boxes[i][real].float().cpu(), "labels": target_labels[i][real].long().cpu()})
        if preds:
            self.metric.update(preds, targets)
            for m in self.extra.values():
                m.update(preds, targets)

    def compute(self) -> dict[str, float]:
        r = self.metric.compute()
        out = {k: float(r[k]) for k in ("map_50", "map", "map_75", f"mar_{self.max_detections}")}
        classes = r["classes"].reshape(-1).tolist()
        per_class = r["map_per_class"].reshape(-1).tolist()
        precision = r["precision"]  # (T, R, K, A, M): IoU 0.5 is T=0, area "all" is A=0, most detections is M=-1
        for j, c in enumerate(classes):
            name = self.class_names[c] if 0 <= c < len(self.class_names) else str(c)
            p = precision[0, :, j, 0, -1]
            out[f"ap_50/{name}"] = float(p[p > -1].mean()) if bool((p > -1).any()) else -1.0
            out[f"ap/{name}"] = float(per_class[j]) if j < len(per_class) else -1.0
        for key, m in self.extra.items():
            r = m.compute()
            out[f"map_{key}"] = float(r["map"])
            for j, c in enumerate(r["classes"].reshape(-1).tolist()):
                name = self.class_names[c] if 0 <= c < len(self.class_names) else str(c)
                p = r["precision"][0, :, j, 0, -1]
                out[f"ap_{key}/{name}"] = float(p[p > -1].mean()) if bool((p > -1).any()) else -1.0
        return out


class PixelAUROC(nn.Module):
    """Pixel AUROC of defect heatmaps against masks, on a seeded random subsample of pixels.

    The heatmap is resized (bilinear) to the mask size; only samples with ``has_mask`` count.

    Args:
        max_pixels: pixels kept per :meth:`update` call (uniform without replacement).
        thresholds: passed to ``BinaryAUROC``: ``None`` (default) = exact on the kept pixels; an int = bins
            uniform in [0, 1], constant memory, but too coarse for rare defects whose heatmaps stay below 0.01.
        seed: subsampling seed (repeatable validation numbers).

    Shapes:
        update: heatmap (B, 1, h, w) probabilities (or logits with ``logits=True``), mask (B, H, W)
        0/1, has_mask (B,) bool (default all). compute: → float (nan without both classes).
    """

    def __init__(self, max_pixels: int = 50_000, thresholds: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.max_pixels = max_pixels
        self.auroc = BinaryAUROC(thresholds=thresholds)
        self.generator = torch.Generator().manual_seed(seed)
        self._seen_pos = False
        self._seen_neg = False
        self.pro = PerRegionOverlap()

    def reset(self) -> None:
        self.auroc.reset()
        self.pro.reset()
        self._seen_pos = self._seen_neg = False

    @torch.no_grad()
    def update(self, heatmap: Tensor, mask: Tensor, has_mask: Tensor | None = None, logits: bool = False) -> None:
        if has_mask is not None:
            heatmap, mask = heatmap[has_mask.bool()], mask[has_mask.bool()]
        if heatmap.shape[0] == 0:
            return
        prob = heatmap.float().sigmoid() if logits else heatmap.float()
        prob = F.interpolate(prob, size=mask.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
        self.pro.update(prob[:, 0], mask)
        prob = prob.flatten().cpu()
        target = (mask > 0).flatten().long().cpu()
        if prob.numel() > self.max_pixels:
            idx = torch.randperm(prob.numel(), generator=self.generator)[: self.max_pixels]
            prob, target = prob[idx], target[idx]
        self._seen_pos |= bool(target.any())
        self._seen_neg |= bool((target == 0).any())
        self.auroc.update(prob, target)

    def compute(self) -> float:
        if not (self._seen_pos and self._seen_neg):
            return float("nan")
        return float(self.auroc.compute())

    def compute_pro(self) -> float:
        """PRO (normalised area up to FPR 0.3) of every pixel seen since :meth:`reset`; nan as :meth:`compute`."""
        return self.pro.compute()


class PerRegionOverlap(nn.Module):
    """Per-region overlap (PRO, MVTec AD): every defect region counts the same, whatever its size.

    For a threshold t, a ground-truth region's overlap is the share of its pixels with heatmap
    >= t; PRO(t) is the mean over all regions (8-connected components of the masks, over all
    samples), FPR(t) the share of defect-free pixels >= t. The PRO-vs-FPR curve is integrated
    (trapezoids, starting at (0, 0)) up to ``max_fpr`` and divided by ``max_fpr``: 1.0 for a
    heatmap that covers every region before any false positive, about ``max_fpr / 2`` for
    chance. Unlike pixel AUROC, a small missed region weighs as much as a large found one.

    Thresholds are ``num_bins`` equal steps of [0, 1] (heatmaps are probabilities); counts are
    accumulated per bin, so memory is constant in the number of pixels.

    Args:
        max_fpr: integration limit (MVTec AD: 0.3).
        num_bins: threshold resolution (thresholds uniform in logit space, |logit| <= 12).

    Shapes:
        update: heatmap (B, H, W) probabilities in [0, 1] at the mask size, mask (B, H, W) 0/1.
        compute: → float (nan without both defect regions and defect-free pixels).
    """

    def __init__(self, max_fpr: float = 0.3, num_bins: int = 1000) -> None:
        super().__init__()
        if not 0 < max_fpr <= 1:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        self.max_fpr, self.num_bins = max_fpr, num_bins
        self.reset()

    def reset(self) -> None:
        self._overlap_sum = np.zeros(self.num_bins, dtype=np.float64)  # sum over regions of share >= threshold k
        self._neg_counts = np.zeros(self.num_bins, dtype=np.int64)  # defect-free pixels per bin
        self._regions = 0

    def _bins(self, values: np.ndarray) -> np.ndarray:
        # thresholds uniform in logit space (|logit| <= 12): defect heatmaps of rare defects put
        # almost every pixel below 0.01, where uniform probability bins would merge them all
        v = np.asarray(values, dtype=np.float64)  # float32 rounds 1 - 1e-12 to 1: log1p(-1) = -inf
        logit = np.log(np.clip(v, 1e-12, 1.0)) - np.log1p(-np.clip(v, 0.0, 1.0 - 1e-12))
        t = (np.clip(logit, -12.0, 12.0) + 12.0) / 24.0
        return np.clip((t * self.num_bins).astype(np.int64), 0, self.num_bins - 1)

    @torch.no_grad()
    def update(self, heatmap: Tensor, mask: Tensor) -> None:
        if heatmap.shape != mask.shape:
            raise ValueError(f"heatmap {tuple(heatmap.shape)} and mask {tuple(mask.shape)} must have the same (B, H, W) shape")
        heat = heatmap.detach().float().cpu().numpy()
        masks = (mask.detach().cpu().numpy() > 0).astype(np.uint8)
        for h, m in zip(heat, masks):
            bins = self._bins(h)
            self._neg_counts += np.bincount(bins[m == 0], minlength=self.num_bins)
            n, regions = cv2.connectedComponents(m, connectivity=8)
            if n <= 1:
                continue
            ids = regions[m > 0].astype(np.int64) - 1
            hist = np.bincount(ids * self.num_bins + bins[m > 0], minlength=(n - 1) * self.num_bins).reshape(n - 1, self.num_bins)
            at_least = hist[:, ::-1].cumsum(1)[:, ::-1]  # pixels >= threshold k, per region
            self._overlap_sum += (at_least / at_least[:, :1]).sum(0)
            self._regions += n - 1

    def compute(self) -> float:
        negatives = int(self._neg_counts.sum())
        if self._regions == 0 or negatives == 0:
            return float("nan")
        # thresholds from high to low: FPR rises from 0, PRO from 0 (a point at (0, 0) opens the curve)
        fpr = np.concatenate([[0.0], self._neg_counts[::-1].cumsum() / negatives])
        pro = np.concatenate([[0.0], self._overlap_sum[::-1] / self._regions])
        keep = fpr <= self.max_fpr
        x, y = fpr[keep], pro[keep]
        last = int(np.flatnonzero(keep)[-1])
        if last + 1 < len(fpr) and x[-1] < self.max_fpr:  # close the curve at max_fpr by interpolation
            x0, x1, y0, y1 = fpr[last], fpr[last + 1], pro[last], pro[last + 1]
            x = np.append(x, self.max_fpr)
            y = np.append(y, y0 + (y1 - y0) * (self.max_fpr - x0) / (x1 - x0))
        return float(np.trapezoid(y, x) / self.max_fpr)
