"""Segmentation metrics on decoded probabilities (torchmetrics underneath).

- per-class IoU: torchmetrics ``MulticlassJaccardIndex`` (``average=None``) of the arg-max class
  at the mask resolution (probabilities upsampled bilinearly from the head's stride);
- :class:`TolerantF1`: F1 of thin structures with a pixel tolerance (cracks at 2 px, the usual
  measure: precision = predicted pixels within ``tolerance`` (Euclidean) of a true one, recall =
  true pixels within ``tolerance`` of a predicted one; dilation by a disk via max-pooling);
- pixel AUROC and PRO of the defect heatmap against the defect classes' union
  (:class:`lineside.fusion.detection_metrics.PixelAUROC`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from lineside.fusion.detection_metrics import PixelAUROC

__all__ = ["SegmentationMetrics", "TolerantF1", "dilate"]


def dilate(mask: Tensor, radius: float) -> Tensor:
    """(B, H, W) bool → bool: every pixel within Euclidean ``radius`` of a True pixel."""
    r = int(math.floor(radius))
    if r <= 0:
        return mask.bool()
    ys, xs = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    offsets = [(int(y), int(x)) for y, x in zip(ys.flatten(), xs.flatten()) if y * y + x * x <= radius * radius]
    m = F.pad(mask.bool(), (r, r, r, r))
    h, w = mask.shape[-2:]
    out = torch.zeros_like(mask, dtype=torch.bool)
    for dy, dx in offsets:  # a disk: the union of shifted copies
        out |= m[..., r + dy : r + dy + h, r + dx : r + dx + w]
    return out


class TolerantF1(Metric):
    """F1 of a binary thin-structure mask with a distance tolerance (summed over all pixels seen).

    Shapes:
        update: pred (B, H, W) bool, target (B, H, W) bool. compute: → dict ``f1``, ``precision``,
        ``recall`` (nan where undefined: no predicted / no true pixels).
    """

    full_state_update = False

    def __init__(self, tolerance: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance
        for name in ("pred_hit", "pred_total", "true_hit", "true_total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        pred, target = pred.bool(), target.bool()
        self.pred_hit += (pred & dilate(target, self.tolerance)).sum()
        self.pred_total += pred.sum()
        self.true_hit += (target & dilate(pred, self.tolerance)).sum()
        self.true_total += target.sum()

    def compute(self) -> dict[str, Tensor]:
        p = self.pred_hit.float() / self.pred_total.float() if self.pred_total else torch.tensor(float("nan"))
        r = self.true_hit.float() / self.true_total.float() if self.true_total else torch.tensor(float("nan"))
        if self.pred_total and self.true_total:
            f1 = 2 * p * r / (p + r) if (p + r) > 0 else torch.tensor(0.0)
        elif self.true_total or self.pred_total:
            f1 = torch.tensor(0.0)  # one side empty: nothing matched
        else:
            f1 = torch.tensor(float("nan"))
        return {"f1": f1, "precision": p, "recall": r}


class SegmentationMetrics(nn.Module):
    """Per-class IoU, tolerant F1 of the thin classes and pixel AUROC / PRO of the defect heatmap.

    Args:
        class_names: the K foreground class names (mask values 1..K).
        defect_classes: mask values of the defect classes (heatmap positives).
        thin_classes: mask values scored with :class:`TolerantF1` (named ``<class>_f1_2px``).
        tolerance: pixels of the thin-class tolerance.

    Shapes:
        update: defect_masks (N, K, h, w) probabilities, defect_heatmap (N, 1, h, w), seg_mask (N, H, W)
        int64, has_seg (N,) bool (default all).
    """

    def __init__(self, class_names: Sequence[str], defect_classes: Sequence[int], thin_classes: Sequence[int] = (),
                 tolerance: float = 2.0) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.defect_classes = list(defect_classes)
        self.thin_classes = list(thin_classes)
        self.tolerance = tolerance
        self.iou = MulticlassJaccardIndex(num_classes=len(self.class_names) + 1, average=None)
        self.thin = nn.ModuleList(TolerantF1(tolerance) for _ in self.thin_classes)
        self.pixel_auroc = PixelAUROC()
        self.images = 0

    @torch.no_grad()
    def update(self, defect_masks: Tensor, defect_heatmap: Tensor, seg_mask: Tensor, has_seg: Tensor | None = None) -> None:
        if has_seg is not None:
            keep = has_seg.bool().to(defect_masks.device)
            defect_masks, defect_heatmap, seg_mask = defect_masks[keep], defect_heatmap[keep], seg_mask.to(keep.device)[keep]
        if defect_masks.shape[0] == 0:
            return
        size = seg_mask.shape[-2:]
        fg = F.interpolate(defect_masks.float(), size=size, mode="bilinear", align_corners=False)
        probs = torch.cat([(1.0 - fg.sum(1, keepdim=True)).clamp_min(0.0), fg], dim=1)
        pred = probs.argmax(1).cpu()
        target = seg_mask.long().cpu()
        self.iou.update(pred, target)
        for metric, c in zip(self.thin, self.thin_classes):
            metric.update(pred == c, target == c)
        defect = torch.zeros_like(target, dtype=torch.uint8)
        for c in self.defect_classes:
            defect |= (target == c).to(torch.uint8)
        self.pixel_auroc.update(defect_heatmap.float().cpu(), defect)
        self.images += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {}
        iou = self.iou.compute().tolist()
        names = ["background", *self.class_names]
        out = {f"iou/{n}": float(v) for n, v in zip(names, iou)}
        out["miou"] = float(sum(iou[1:]) / max(1, len(iou) - 1))
        out["miou_defects"] = float(sum(iou[c] for c in self.defect_classes) / max(1, len(self.defect_classes)))
        for metric, c in zip(self.thin, self.thin_classes):
            r = metric.compute()
            tag = f"{names[c]}_{{}}_{int(self.tolerance) if float(self.tolerance).is_integer() else self.tolerance}px"
            for k in ("f1", "precision", "recall"):
                out[tag.format(k)] = float(r[k])
        auroc = self.pixel_auroc.compute()
        if not math.isnan(auroc):
            out["pixel_auroc"] = auroc
            out["pro"] = self.pixel_auroc.compute_pro()
        return out

    def reset(self) -> None:
        self.iou.reset()
        for m in self.thin:
            m.reset()
        self.pixel_auroc.reset()
        self.images = 0
