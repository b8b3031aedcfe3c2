"""BoxDecoder: the localization head's raw maps → top-K boxes, scores, labels and the defect heatmap.

CenterNet decoding with fixed shapes only (no data-dependent sizes), so it runs inside every
exported graph (ONNX, TensorRT, AOTInductor): sigmoid, 3×3 max-pool peak suppression (a cell
survives only if it is the maximum of its neighbourhood, CenterNet's NMS), top-K over C·h·w,
then boxes from the size and offset maps at the peaks. Boxes come out in pixels of the frame
the deployable model was given (it resizes ``input_size`` → ``train_size`` inside the graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.localization_head import LocalizationOutput

if TYPE_CHECKING:
    from lineside.fusion.outputs import TensorSpec

__all__ = ["BoxDecoder", "BOX_SCORE_THRESHOLD"]

BOX_SCORE_THRESHOLD = 0.3  # boxes reported by score/station and compared by parity checks from this score
_MAX_LOG_SIZE = 10.0  # exp(10) ≈ 22000 px: keeps exp finite for wild size logits


class BoxDecoder(nn.Module):
    """Top-K CenterNet decoding.

    Args:
        stride: model-input (training-size) pixels per heatmap cell (``ImageEncoder.strides[level_index]``).
        train_size: (H, W) the model sees (training size).
        input_size: (H, W) of the frames the deployable model takes; boxes are scaled to it.
            Default ``train_size``.
        top_k: K, fixed (at most C·h·w); fewer real peaks are padded by low-score entries.
        pool_kernel: peak-suppression window (odd).
        tta_views: views stacked on the batch by test-time augmentation (V·N rows in); boxes are
            decoded from the first (identity) view only.

    Shapes:
        forward: :class:`LocalizationOutput` (heatmap (N, C, h, w), size/offset (N, 2, h, w),
        defect (N, 1, h, w)) → (boxes (N, K, 4) float32 xyxy input-frame pixels, box_scores
        (N, K) float32 descending, box_labels (N, K) int64, defect_heatmap (N, 1, h, w) float32
        in [0, 1]), with K = ``top_k`` (at most C·h·w).
    """

    def __init__(
        self,
        stride: float,
        train_size: Sequence[int],
        input_size: Sequence[int] | None = None,
        top_k: int = 100,
        pool_kernel: int = 3,
        tta_views: int = 1,
    ) -> None:
        super().__init__()
        if pool_kernel % 2 != 1:
            raise ValueError(f"pool_kernel must be odd, got {pool_kernel}")
        self.stride = float(stride)
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.input_size = tuple(int(v) for v in (input_size or self.train_size))
        self.top_k = int(top_k)
        self.pool_kernel = pool_kernel
        self.tta_views = tta_views
        self.scale_y = self.input_size[0] / self.train_size[0]
        self.scale_x = self.input_size[1] / self.train_size[1]

    def outputs(self) -> list[TensorSpec]:
        # imported here: export/deployable.py builds its decoders from this module
        from lineside.fusion.outputs import TensorSpec

        k = self.top_k
        h, w = -(-self.train_size[0] // int(self.stride)), -(-self.train_size[1] // int(self.stride))
        return [
            TensorSpec("boxes", "float32", ("N", k, 4), "box", "top-K defect boxes x1, y1, x2, y2 in input-frame pixels"),
            TensorSpec("box_scores", "float32", ("N", k), "box_score", "box confidence (peak heatmap probability), descending"),
            TensorSpec("box_labels", "int64", ("N", k), "box_label", "defect class index of each box"),
            TensorSpec("defect_heatmap", "float32", ("N", 1, h, w), "float", "class-agnostic defect probability per heatmap cell"),
        ]

    def forward(self, loc: LocalizationOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        heatmap, size, offset, defect = loc.heatmap, loc.size, loc.offset, loc.defect
        if self.tta_views > 1:
            n = heatmap.shape[0] // self.tta_views
            heatmap, size, offset, defect = heatmap[:n], size[:n], offset[:n], defect[:n]
        b, c, h, w = heatmap.shape
        heat = heatmap.float().sigmoid()
        peaks = F.max_pool2d(heat, self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        # suppressed cells move below every peak (heat - 1 < 0) instead of to a flat 0, so top-K
        # order stays fully determined by the heatmap (ties at 0 would be ordered differently by
        # each backend); their reported score is 0
        heat = torch.where(peaks == heat, heat, heat - 1.0)
        k = self.top_k
        if k > c * h * w:
            raise ValueError(f"top_k={k} exceeds the {c}x{h}x{w} heatmap cells; lower top_k")
        key, index = heat.flatten(1).topk(k, dim=1)  # (N, K), sorted descending
        scores = key.clamp_min(0.0)
        labels = torch.div(index, h * w, rounding_mode="floor")
        cell = index - labels * (h * w)
        ys = torch.div(cell, w, rounding_mode="floor")
        xs = cell - ys * w
        gather = cell.unsqueeze(1).expand(-1, 2, -1)
        wh = size.float().flatten(2).gather(2, gather).clamp(max=_MAX_LOG_SIZE).exp()  # (N, 2, K)
        off = offset.float().flatten(2).gather(2, gather)
        cx = (xs.to(heat.dtype) + off[:, 0]) * self.stride
        cy = (ys.to(heat.dtype) + off[:, 1]) * self.stride
        th, tw = self.train_size
        x1 = (cx - wh[:, 0] / 2).clamp(0, tw) * self.scale_x
        x2 = (cx + wh[:, 0] / 2).clamp(0, tw) * self.scale_x
        y1 = (cy - wh[:, 1] / 2).clamp(0, th) * self.scale_y
        y2 = (cy + wh[:, 1] / 2).clamp(0, th) * self.scale_y
        boxes = torch.stack([x1, y1, x2, y2], dim=-1)
        return boxes, scores, labels.to(torch.int64), defect.float().sigmoid()
