"""SegmentationCriterion: focal cross-entropy + per-class Dice on the segmentation head's logits.

Logits (B, K + 1, h, w) at the head's stride are upsampled (bilinear) to the mask size, so thin
cracks are supervised at full resolution. Only samples with ``has_seg`` count: the others add no
loss and get no gradient (mixed batches of graded and segmented cells train together).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.segmentation_head import SegmentationOutput

__all__ = ["SegmentationCriterion"]


class SegmentationCriterion(nn.Module):
    """``weight_dict`` criterion: ``loss_seg_ce`` (focal CE over pixels) and ``loss_seg_dice``
    (soft Dice per foreground class, averaged over the K classes).

    Args:
        num_classes: foreground classes K (the head's).
        weight_dict: weights of ``loss_seg_ce`` and ``loss_seg_dice``.
        focal_gamma: focal exponent of the CE term (0 = plain cross-entropy).
        class_weights: optional (K + 1,) per-class CE weights (background first).
        dice_smooth: added to Dice's numerator and denominator (a class absent from both the
            target and the prediction scores ≈ 1).

    Shapes:
        forward: :class:`SegmentationOutput` (logits (B, K + 1, h, w)) and targets with ``seg_mask``
        (B, H, W) int64 class indices and ``has_seg`` (B,) bool (default all True) → dict with the
        weighted terms and ``loss``.
    """

    def __init__(self, num_classes: int = 4, weight_dict: dict[str, float] | None = None, focal_gamma: float = 2.0,
                 class_weights: Sequence[float] | None = None, dice_smooth: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict or {"loss_seg_ce": 1.0, "loss_seg_dice": 1.0})
        unknown = set(self.weight_dict) - {"loss_seg_ce", "loss_seg_dice"}
        if unknown:
            raise ValueError(f"weight_dict has unknown terms {sorted(unknown)}; use loss_seg_ce, loss_seg_dice")
        self.focal_gamma, self.dice_smooth = focal_gamma, dice_smooth
        if class_weights is not None and len(class_weights) != num_classes + 1:
            raise ValueError(f"class_weights needs {num_classes + 1} values (background first), got {len(class_weights)}")
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None,
                             persistent=False)

    def loss_seg_ce(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits, dim=1)
        logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)  # (B, H, W)
        loss = -logp_t
        if self.focal_gamma:
            loss = loss * (1.0 - logp_t.exp()).clamp_min(0.0).pow(self.focal_gamma)
        if self.class_weights is not None:
            w = self.class_weights[target]
            return (loss * w).sum() / w.sum().clamp_min(1e-6)
        return loss.mean()

    def loss_seg_dice(self, logits: Tensor, target: Tensor) -> Tensor:
        probs = logits.softmax(1)[:, 1:]  # foreground classes
        onehot = F.one_hot(target, self.num_classes + 1).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        inter = (probs * onehot).sum((0, 2, 3))
        total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + self.dice_smooth) / (total + self.dice_smooth)
        return (1.0 - dice).mean()

    def forward(self, raw: SegmentationOutput, targets: dict) -> dict[str, Tensor]:
        logits = raw.logits
        mask = targets["seg_mask"].to(logits.device).long()
        keep = targets.get("has_seg")
        keep = torch.ones(mask.shape[0], dtype=torch.bool, device=logits.device) if keep is None else keep.to(logits.device).bool()
        if logits.shape[1] != self.num_classes + 1:
            raise ValueError(f"logits have {logits.shape[1]} channels, the criterion expects {self.num_classes} classes + background")
        if not bool(keep.any()):  # nothing segmented in this batch: zero loss, zero gradient
            zero = logits.sum() * 0.0
            terms = {k: zero for k in self.weight_dict}
        else:
            x = F.interpolate(logits[keep].float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            t = mask[keep]
            if int(t.max()) > self.num_classes or int(t.min()) < 0:
                raise ValueError(f"seg_mask values must be in 0..{self.num_classes}, got {int(t.min())}..{int(t.max())}")
            terms = {k: getattr(self, k)(x, t) for k in self.weight_dict}
        out = {k: v * self.weight_dict[k] for k, v in terms.items()}
        out["loss"] = sum(out.values())
        return out
