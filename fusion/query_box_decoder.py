"""QueryBoxDecoder: the query localization head's raw outputs → top-K boxes, scores, labels and
the defect heatmap, with fixed shapes (exportable like :class:`~lineside.fusion.box_decoder.BoxDecoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lineside.fusion.box_ops import box_cxcywh_to_xyxy
from lineside.fusion.query_localization_output import QueryLocalizationOutput

if TYPE_CHECKING:
    from lineside.fusion.outputs import TensorSpec

__all__ = ["QueryBoxDecoder"]


class QueryBoxDecoder(nn.Module):
    """Top-K decoding of the query head with fixed shapes (exportable like :class:`BoxDecoder`):
    sigmoid class probabilities, top-K over all Q·C query-class pairs (Deformable DETR's
    postprocess; a query may give boxes of several classes, no NMS: the one-to-one matching
    trained duplicates away), boxes from normalised cxcywh to xyxy input-frame pixels.

    Args:
        stride: model-input pixels per defect-heatmap cell (only the output spec uses it).
        train_size: (H, W) the model sees. input_size: (H, W) of the deployable's frames (default train_size).
        top_k: K (at most Q·C). tta_views: views stacked on the batch; boxes from the first view only.

    Shapes:
        forward: :class:`QueryLocalizationOutput` → (boxes (N, K, 4) float32 xyxy input-frame pixels,
        box_scores (N, K) float32 descending, box_labels (N, K) int64, defect_heatmap (N, 1, h, w)
        float32 in [0, 1]) — the same outputs as :class:`~lineside.fusion.box_decoder.BoxDecoder`.
    """

    def __init__(self, stride: float, train_size: Sequence[int], input_size: Sequence[int] | None = None,
                 top_k: int = 100, tta_views: int = 1) -> None:
        super().__init__()
        self.stride = float(stride)
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.input_size = tuple(int(v) for v in (input_size or self.train_size))
        self.top_k, self.tta_views = int(top_k), tta_views

    def outputs(self) -> list[TensorSpec]:
        from lineside.fusion.outputs import TensorSpec

        k = self.top_k
        h, w = -(-self.train_size[0] // int(self.stride)), -(-self.train_size[1] // int(self.stride))
        return [
            TensorSpec("boxes", "float32", ("N", k, 4), "box", "top-K defect boxes x1, y1, x2, y2 in input-frame pixels"),
            TensorSpec("box_scores", "float32", ("N", k), "box_score", "box confidence (query class probability), descending"),
            TensorSpec("box_labels", "int64", ("N", k), "box_label", "defect class index of each box"),
            TensorSpec("defect_heatmap", "float32", ("N", 1, h, w), "float", "class-agnostic defect probability per heatmap cell"),
        ]

    def forward(self, loc: QueryLocalizationOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits, boxes, defect = loc.logits, loc.boxes, loc.defect
        if self.tta_views > 1:
            n = logits.shape[0] // self.tta_views
            logits, boxes, defect = logits[:n], boxes[:n], defect[:n]
        b, q, c = logits.shape
        if self.top_k > q * c:
            raise ValueError(f"top_k={self.top_k} exceeds the {q}x{c} query-class pairs; lower top_k")
        scores, index = logits.float().sigmoid().flatten(1).topk(self.top_k, dim=1)
        query = torch.div(index, c, rounding_mode="floor")
        labels = index - query * c
        picked = boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        th, tw = self.train_size
        x1, y1, x2, y2 = box_cxcywh_to_xyxy(picked).unbind(-1)
        sy, sx = self.input_size[0] / th, self.input_size[1] / tw
        out = torch.stack([(x1 * tw).clamp(0, tw) * sx, (y1 * th).clamp(0, th) * sy,
                           (x2 * tw).clamp(0, tw) * sx, (y2 * th).clamp(0, th) * sy], -1)
        return out, scores, labels.to(torch.int64), defect.float().sigmoid()
