"""GradeHeatmapDecoder: the grading head's class-activation map → where the defect grade came from.

For graded-only data (ELPV cells, radiographs) there are no boxes, yet an operator wants to see
which crack made a cell "severe". :meth:`GradingHead.grade_map` splits every grade logit exactly
into one share per image cell; this decoder turns those shares into one map per frame:

    contrast = Σ_{k≥1} w_k · map_k − map_0,   w_k = p_k / Σ_{j≥1} p_j   (defective grades vs ok)
    excess   = relu(contrast − mean over cells(contrast))
    heat     = excess / max(excess) · P(defective)

Grade 0 is "ok" (as in the AUROC ok-vs-defective); a cell is hot where its tokens push the logits
towards the defective grades the model believes in *more than the frame's average cell*. After
the fusion transformer every token carries much of the whole frame, so the shares themselves
are nearly uniform; their excess over the mean is what differs between cells (on ELPV cells
graded severe by a quickstart model the excess sits on the cracks, the raw shares cover the cell).
The map lies in [0, 1], its hottest cell equals P(defective) = 1 − p_0, so an ok frame's map
stays dim. Fixed shapes only: it runs inside every exported graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import Tensor, nn

if TYPE_CHECKING:
    from lineside.fusion.outputs import TensorSpec

__all__ = ["GradeHeatmapDecoder", "grade_heatmap_grid"]

_MIN_PEAK = 1e-4  # logits: a flatter contrast than this stays near 0 instead of blowing noise up


def grade_heatmap_grid(image_encoder: nn.Module, train_size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the grade map: the finest configured image level at ``train_size``."""
    stride = int(min(image_encoder.strides))
    return -(-int(train_size[0]) // stride), -(-int(train_size[1]) // stride)


class GradeHeatmapDecoder(nn.Module):
    """Per-grade cell shares of ``V·N`` views and the decided probabilities → one defect heatmap per frame.

    Args:
        grid: (h, w) of the map (:func:`grade_heatmap_grid`).
        tta_views: views stacked on the batch; the map comes from the first (identity) view.

    Shapes:
        forward: grade_map (V·N, K, h, w), grade_probs (N, K) → grade_heatmap (N, 1, h, w) float32 in [0, 1].
    """

    def __init__(self, grid: Sequence[int], tta_views: int = 1) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.tta_views = tta_views

    def outputs(self) -> list[TensorSpec]:
        from lineside.fusion.outputs import TensorSpec

        h, w = self.grid
        return [TensorSpec("grade_heatmap", "float32", ("N", 1, h, w), "heatmap",
                           "where the defective grades came from (grading class-activation map), 0..1, peak = P(defective)")]

    def forward(self, grade_map: Tensor, probs: Tensor) -> Tensor:
        n = probs.shape[0]
        cam = grade_map[:n].float()
        probs = probs.float()
        p_def = probs[:, 1:].sum(-1)
        weights = probs[:, 1:] / p_def.clamp_min(1e-6).unsqueeze(-1)
        contrast = (cam[:, 1:] * weights[:, :, None, None]).sum(1) - cam[:, 0]
        pos = (contrast - contrast.flatten(1).mean(1)[:, None, None]).clamp_min(0.0)
        peak = pos.flatten(1).amax(1).clamp_min(_MIN_PEAK)
        return (pos / peak[:, None, None] * p_def[:, None, None]).unsqueeze(1)
