"""Box targets of a padded detection batch, shared by the localization criteria.

Both the CenterNet :class:`~lineside.fusion.localization_criterion.LocalizationCriterion` and the
query :class:`~lineside.fusion.query_localization_criterion.QueryLocalizationCriterion` read the
batch of :func:`lineside.vision.detection_data.detection_collate` the same way:

- ``boxes`` (B, N, 4) xyxy model-input pixels, ``labels`` (B, N), ``box_mask`` (B, N): a box is
  *valid* where ``box_mask`` is set, its label lies in ``[0, C)`` and it has a positive area;
- ``has_boxes`` (B,) (optional, mixed batches): a sample is *labelled* where it is set or where it
  has a valid box; a labelled sample without boxes is a defect-free image;
- ``mask`` (B, H, W) 0/1 with ``has_mask`` (B,) (optional): the defect heatmap's target is the
  mask's coverage of each cell where a mask exists, else the coverage of each cell by the union of
  the sample's boxes; a sample with a mask counts as labelled.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BoxTargets", "padded_box_targets", "target_image_size", "box_coverage", "defect_target"]


class BoxTargets(NamedTuple):
    """The padded boxes of a batch with their validity.

    Attributes:
        boxes: (B, N, 4) float32 xyxy model-input pixels.
        labels: (B, N) class indices (padding may hold anything).
        valid: (B, N) bool, a real box with a class in ``[0, C)`` and a positive area.
        labelled: (B,) bool, the sample carries box labels (``has_boxes``, or a valid box).
    """

    boxes: Tensor
    labels: Tensor
    valid: Tensor
    labelled: Tensor


def padded_box_targets(targets: dict, batch_size: int, num_classes: int, device: torch.device) -> BoxTargets:
    """``targets`` (the padded detection batch) → :class:`BoxTargets` on ``device``."""
    b, c = batch_size, num_classes
    boxes = targets["boxes"].to(device=device, dtype=torch.float32).reshape(b, -1, 4)
    labels = targets["labels"].to(device).reshape(b, -1)
    valid = targets["box_mask"].to(device).reshape(b, -1).bool() & (labels >= 0) & (labels < c)
    valid &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    has_boxes = targets.get("has_boxes")
    labelled = torch.ones(b, dtype=torch.bool, device=device) if has_boxes is None else has_boxes.to(device).bool()
    return BoxTargets(boxes, labels, valid, labelled | valid.any(1))


def target_image_size(targets: dict) -> tuple[float, float] | None:
    """(H, W) of the model input the boxes refer to: from ``image`` or ``mask``, else
    ``image_size``; ``None`` when the batch holds none of them."""
    ref = targets.get("image", targets.get("mask"))
    if ref is not None:
        return float(ref.shape[-2]), float(ref.shape[-1])
    if "image_size" in targets:
        return float(targets["image_size"][0]), float(targets["image_size"][1])
    return None


def box_coverage(boxes: Tensor, valid: Tensor, h: int, w: int, sy: float, sx: float) -> Tensor:
    """(B, N, 4) xyxy pixels with (B, N) valid → (B, 1, h, w) coverage of each cell by the union of boxes.

    Cell ``(i, j)`` covers pixels ``[j·sx, (j+1)·sx) × [i·sy, (i+1)·sy)``."""
    b = boxes.shape[0]
    if boxes.shape[1] == 0:
        return boxes.new_zeros(b, 1, h, w)
    gx = torch.arange(w, device=boxes.device, dtype=torch.float32).view(1, 1, 1, w) * sx
    gy = torch.arange(h, device=boxes.device, dtype=torch.float32).view(1, 1, h, 1) * sy
    x1, y1, x2, y2 = (v[..., None, None] for v in boxes.float().unbind(-1))
    ox = (torch.minimum(x2, gx + sx) - torch.maximum(x1, gx)).clamp_min(0) / sx
    oy = (torch.minimum(y2, gy + sy) - torch.maximum(y1, gy)).clamp_min(0) / sy
    return (ox * oy * valid[..., None, None]).amax(1, keepdim=True).clamp(0, 1)


def defect_target(targets: dict, box_targets: BoxTargets, h: int, w: int, sy: float, sx: float) -> tuple[Tensor, Tensor]:
    """The class-agnostic defect heatmap target on an (h, w) grid of (sy, sx)-pixel cells.

    Returns:
        (defect (B, 1, h, w) float32 in [0, 1], labelled (B,) bool: ``box_targets.labelled`` or a mask).
    """
    boxes, _, valid, labelled = box_targets
    defect = box_coverage(boxes, valid, h, w, sy, sx)
    if "mask" in targets and targets.get("has_mask") is not None:
        has_mask = targets["has_mask"].to(boxes.device).bool()
        if has_mask.any():
            mask = targets["mask"].to(device=boxes.device, dtype=torch.float32).unsqueeze(1)
            m = F.interpolate(mask, size=(h, w), mode="area")
            defect = torch.where(has_mask.view(-1, 1, 1, 1), m.clamp(0, 1), defect)
            labelled = labelled | has_mask
    return defect, labelled
