"""Box helpers of the query localization head, its matcher, criterion and decoder.

Normalised boxes are ``(cx, cy, w, h)`` in [0, 1]; pixel boxes are xyxy. Conversion and
generalized IoU come from ``torchvision.ops`` (``box_convert``, ``generalized_box_iou``),
re-exported here under DETR's names so callers import one module.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "inverse_sigmoid"]


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """(…, 4) ``(cx, cy, w, h)`` → (…, 4) ``(x1, y1, x2, y2)``."""
    return box_convert(b, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """(…, 4) ``(x1, y1, x2, y2)`` → (…, 4) ``(cx, cy, w, h)``."""
    return box_convert(b, "xyxy", "cxcywh")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (the refinement space of normalised boxes)."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))
