"""Domain alignment: maximum mean discrepancy (MMD) between pooled features of two domains.

Used to fine-tune a model trained on one wafer size (8-inch) for another (12-inch) with few labels:
besides the classification loss on the labelled maps, ``MMD²(features(source), features(target))``
pulls the pooled features of unlabelled target maps towards those of the source (Long et al. 2015,
"Learning Transferable Features with Deep Adaptation Networks": a sum of Gaussian kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GaussianMMD", "mmd2"]


def mmd2(x: Tensor, y: Tensor, scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), bandwidth: Tensor | float | None = None) -> Tensor:
    """Biased (V-statistic) squared MMD between samples ``x`` (N, D) and ``y`` (M, D).

    The kernel is a sum of Gaussians ``exp(-|a - b|² / (2 s² h))`` over ``scales`` s, where the
    base bandwidth ``h`` is the mean pairwise squared distance of the pooled sample (detached,
    so the loss cannot shrink by inflating it) unless given. Non-negative; exactly 0 when the two
    samples are the same multiset.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2 takes (N, D) and (M, D) features, got {tuple(x.shape)} and {tuple(y.shape)}")
    z = torch.cat([x, y]).float()
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        n = z.shape[0]
        h = d2.detach().sum() / max(n * n - n, 1)
        h = h.clamp_min(1e-8)
    else:
        h = torch.as_tensor(bandwidth, dtype=z.dtype, device=z.device)
    k = sum(torch.exp(-d2 / (2.0 * s * s * h)) for s in scales) / len(scales)
    nx = x.shape[0]
    kxx, kyy, kxy = k[:nx, :nx], k[nx:, nx:], k[:nx, nx:]
    return (kxx.mean() + kyy.mean() - 2.0 * kxy.mean()).clamp_min(0.0)


class GaussianMMD(nn.Module):
    """:func:`mmd2` as a module (a loss term with a weight in a training loop).

    Args:
        scales: kernel widths relative to the mean pairwise distance.

    Shapes:
        forward: source (N, D), target (M, D) features → scalar.
    """

    def __init__(self, scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        return mmd2(source, target, self.scales)
