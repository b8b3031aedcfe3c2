"""GraspDecoder: raw per-token grasp proposals → the K best grasps in sensor metres (exported in the graph).

Top-K with 3-D non-maximum suppression in a fixed number of steps and fixed shapes (only sigmoid,
argmax, gather, where and arithmetic, so it exports to ONNX and parses in TensorRT): K times, take the
proposal with the highest score, then suppress every proposal whose centre lies within
``nms_radius`` metres of it. Once nothing is left, the remaining picks get score 0 (they repeat the
last pick's geometry; a station ignores rows with score 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lineside.fusion.grasp_head import GraspOutput

__all__ = ["GraspDecoder"]


class GraspDecoder(nn.Module):
    """Per-token proposals (normalised frame) → K ranked grasps (sensor frame, metres).

    Args:
        top_k: K grasps per sample (fixed).
        nms_radius: proposals whose centres lie within this distance (m) of a kept one are suppressed.

    Shapes:
        forward: logits (N, G), position (N, G, 3), approach (N, G, 3), closing (N, G, 3), width (N, G),
        padding_mask (N, G) bool, center (N, 3) and scale (N,) of each sample's normalisation →
        (grasp_position (N, K, 3), grasp_approach (N, K, 3), grasp_closing (N, K, 3),
        grasp_width (N, K), grasp_score (N, K)), all float32, best first.
    """

    def __init__(self, top_k: int = 5, nms_radius: float = 0.01) -> None:
        super().__init__()
        if top_k < 1 or nms_radius < 0:
            raise ValueError(f"need top_k >= 1 and nms_radius >= 0, got {top_k}, {nms_radius}")
        self.top_k = int(top_k)
        self.nms_radius = float(nms_radius)

    def outputs(self) -> list:
        """TensorSpec rows of the decoded outputs (parity: the top grasp by position, approach, closing
        and width within their limits, ``grasp_score`` as floats).

        ``TensorSpec`` is imported here, when a deployable is built, so ``fusion`` never imports
        ``export`` at module load (no import cycle with ``export.deployable``)."""
        from lineside.fusion.outputs import TensorSpec

        k = self.top_k
        return [
            TensorSpec("grasp_position", "float32", ("N", k, 3), "float", "grasp centres: the point midway between the jaws, sensor frame (m), best first",
                       atol=1e-3, ranked_by="grasp_score"),  # parity: the top grasp within 1 mm
            TensorSpec("grasp_approach", "float32", ("N", k, 3), "float", "unit approach directions (palm to fingertips)", ranked_by="grasp_score"),
            TensorSpec("grasp_closing", "float32", ("N", k, 3), "float", "unit closing directions (finger to finger, sign arbitrary), perpendicular to approach",
                       ranked_by="grasp_score"),
            TensorSpec("grasp_width", "float32", ("N", k), "float", "gripper opening (m)", ranked_by="grasp_score"),
            TensorSpec("grasp_score", "float32", ("N", k), "float", "graspability in [0, 1]; 0 = no grasp left (ignore the row)"),
        ]

    @property
    def output_names(self) -> list[str]:
        return ["grasp_position", "grasp_approach", "grasp_closing", "grasp_width", "grasp_score"]

    def decode(self, out: GraspOutput, center: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Convenience: decode a :class:`GraspOutput` (what :class:`GraspHead` returns)."""
        return self(out.logits, out.position, out.approach, out.closing, out.width, out.padding_mask, center, scale)

    def forward(
        self,
        logits: Tensor,
        position: Tensor,
        approach: Tensor,
        closing: Tensor,
        width: Tensor,
        padding_mask: Tensor,
        center: Tensor,
        scale: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        scale = scale.float().reshape(-1, 1)  # (N, 1)
        pos = position.float() * scale.unsqueeze(-1) + center.float().unsqueeze(1)  # (N, G, 3) metres
        w = width.float() * scale  # (N, G)
        score = torch.where(padding_mask.to(torch.bool), torch.full_like(logits.float(), -1.0), torch.sigmoid(logits.float()))
        feats = torch.cat([pos, approach.float(), closing.float(), w.unsqueeze(-1)], -1)  # (N, G, 10)
        r2 = self.nms_radius**2
        picked, scores = [], []
        for _ in range(self.top_k):
            best, idx = score.max(1, keepdim=True)  # (N, 1)
            row = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, 1, feats.shape[-1]))  # (N, 1, 10)
            picked.append(row)
            scores.append(best)
            d2 = ((pos - row[..., 0:3]) ** 2).sum(-1)  # (N, G)
            gone = (d2 <= r2) | (torch.arange(score.shape[1], device=score.device).unsqueeze(0) == idx)
            score = torch.where(gone, torch.full_like(score, -1.0), score)
        rows = torch.cat(picked, 1)  # (N, K, 10)
        s = torch.cat(scores, 1).clamp(min=0.0)  # (N, K); exhausted picks (-1) → 0
        return rows[..., 0:3], rows[..., 3:6], rows[..., 6:9], rows[..., 9], s
