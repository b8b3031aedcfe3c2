"""CloudNormalizer: padded clouds in sensor metres → the normalised frame the model was trained in (inside the graph).

The training datasets centre each cloud on its centroid and scale it into the unit ball
(:func:`~.preprocess.normalize`: ``normalized = (sensor - center) / scale`` with ``scale`` the largest
distance from the centroid to a point). A deployed model does the same inside its graph, from the
real points of each padded cloud, and hands ``center`` and ``scale`` to the grasp decoder, which maps
its outputs back to sensor metres. Pure torch, fixed shapes (masked sums and a masked max), so it
exports to ONNX and parses in TensorRT; padded entries may hold anything (zeros, garbage, NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CloudNormalizer"]


class CloudNormalizer(nn.Module):
    """Centre on the centroid of the real points and scale into the unit ball.

    A cloud without real points keeps ``center`` 0 and ``scale`` 1; a single point (or identical
    points) gets ``scale`` 1, as :func:`~.preprocess.normalize` does.

    Shapes:
        forward: points (N, P, 3) float metres, point_mask (N, P) bool True = real point →
        (normalized (N, P, 3) float32 with zeros where padded, center (N, 3) float32 metres,
        scale (N,) float32 metres per normalised unit).
    """

    def forward(self, points: Tensor, point_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = point_mask.to(torch.bool)
        m3 = mask.unsqueeze(-1)
        x = torch.where(m3, points.float(), torch.zeros_like(points, dtype=torch.float32))
        n = mask.to(torch.float32).sum(1, keepdim=True).clamp(min=1.0)  # (N, 1)
        center = x.sum(1) / n  # (N, 3)
        rel = x - center.unsqueeze(1)
        d2 = torch.where(mask, (rel**2).sum(-1), torch.zeros_like(n))  # (N, P)
        scale = d2.amax(1).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        normalized = torch.where(m3, rel / scale.view(-1, 1, 1), torch.zeros_like(rel))
        return normalized, center, scale
