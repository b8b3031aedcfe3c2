"""Hungarian matching of query predictions to target boxes (DETR's ``models/matcher.py``).

The cost of pairing a query with a target box is Deformable DETR's: a sigmoid focal
classification cost, L1 between normalised ``(cx, cy, w, h)`` boxes, minus their generalized IoU;
``scipy.optimize.linear_sum_assignment`` then picks the optimal one-to-one assignment.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lineside.fusion.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["hungarian_match"]


def _focal_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Deformable DETR's focal classification cost: (Q, C) logits, (M,) labels → (Q, M)."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * -F.logsigmoid(-logits)
    pos = alpha * (1 - p) ** gamma * -F.logsigmoid(logits)
    return pos[:, labels] - neg[:, labels]


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor, cost_class: float = 2.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0, focal_alpha: float = 0.25,
                    focal_gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """One sample's optimal one-to-one assignment of predictions to targets
    (``scipy.optimize.linear_sum_assignment`` on class + L1 + GIoU costs).

    Args:
        logits: (Q, C) class logits; boxes: (Q, 4) normalised cxcywh predictions.
        tgt_labels: (M,) int64; tgt_boxes: (M, 4) normalised cxcywh.

    Returns:
        (prediction indices, target indices), each (min(Q, M),) int64, sorted by prediction index.
    """
    from scipy.optimize import linear_sum_assignment

    if tgt_labels.numel() == 0 or logits.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
    c = (cost_class * _focal_cost(logits, tgt_labels, focal_alpha, focal_gamma)
         + cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
         - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
    c = torch.nan_to_num(c.cpu(), nan=1e6, posinf=1e6, neginf=-1e6).numpy()
    rows, cols = linear_sum_assignment(c)
    order = np.argsort(rows)
    return torch.as_tensor(rows[order], dtype=torch.int64), torch.as_tensor(cols[order], dtype=torch.int64)
