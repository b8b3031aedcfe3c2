"""PointEncoder: padded point clouds → group tokens for the fusion transformer (PointNet++ set abstraction).

Every step is fixed-shape tensor work (no data-dependent shapes, no Python branches on
values), so the encoder exports to ONNX and parses in TensorRT: farthest-point sampling is a
loop of ``G`` iterations over argmax / gather / min, grouping is masked squared distance +
``topk``, pooling is a max over the ``k`` neighbours.

Padding: the cloud arrives as ``points`` (B, P, 3) with ``point_mask`` (B, P), True = real
point. Padded entries may hold anything (zeros, garbage, NaN): they are zeroed first, never
chosen as centres and never grouped, so a cloud gives the same tokens however it is padded.

Clouds with fewer distinct real points than ``G``: once every real location has been chosen,
farthest-point sampling keeps returning an already chosen point (distance 0). Those repeat
groups are computed like the others (finite values) but marked True in ``padding_mask``, so
fusion attends to each distinct location once; a cloud with no real point gives ``G`` padding
tokens. The same rule marks exact duplicate coordinates of a real cloud as padding.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = ["EncoderOutput", "PlainPointNet", "PointEncoder", "farthest_point_sample", "knn_group"]


class EncoderOutput(NamedTuple):
    """What every modality encoder returns; the same fields, in the same order, as
    ``lineside.vision.EncoderOutput`` (the fusion transformer reads the fields, so it takes
    either). Declared here because ``pointcloud`` never imports ``vision``.

    Attributes:
        tokens: (B, L, D) float features.
        positions: (B, L, 3) token positions: group centres in metres (sensor frame).
        padding_mask: (B, L) bool, True where a token is padding.
        levels: grid sizes of image feature levels; always empty for points.
        maps: backbone feature maps of image encoders for dense heads; always empty for points.
    """

    tokens: Tensor
    positions: Tensor
    padding_mask: Tensor
    levels: tuple = ()
    maps: tuple = ()


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, C), idx (B, ...) int64 → (B, ..., C)."""
    b, _, c = x.shape
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, c))
    return out.reshape(*idx.shape, c)


def farthest_point_sample(points: Tensor, mask: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Farthest-point sampling of ``num_groups`` centres among the real points.

    The first centre is the real point farthest from the cloud's (masked) centroid, so the
    choice does not depend on the order of the points; each next centre is the real point
    farthest from all chosen ones.

    Args:
        points: (B, P, 3) float, padded entries already finite.
        mask: (B, P) bool, True = real point.
        num_groups: G, a Python int (the loop is unrolled in exported graphs).

    Returns:
        idx: (B, G) int64 indices into P.
        repeat: (B, G) bool, True where no new location was left (the centre repeats an earlier
        one, or the cloud has no real point).
    """
    b = points.shape[0]
    pt = points.transpose(1, 2).contiguous()  # (B, 3, P): distances reduce over 3 rows of contiguous P (~20x faster at 16k points)
    m = mask.to(points.dtype)
    n = m.sum(1, keepdim=True)  # (B, 1)
    centroid = (pt * m.unsqueeze(1)).sum(2, keepdim=True) / n.clamp(min=1.0).unsqueeze(1)  # (B, 3, 1)
    neg = torch.full_like(m, -1.0)
    dist = torch.where(mask, ((pt - centroid) ** 2).sum(1), neg)  # masked points: -1, never the argmax
    last = dist.argmax(1)  # (B,)
    indices = [last]
    repeats = [n.squeeze(1) < 0.5]
    dist = torch.where(mask, torch.full_like(m, float("inf")), neg)
    for _ in range(1, num_groups):
        centre = torch.gather(pt, 2, last.view(b, 1, 1).expand(b, 3, 1))  # (B, 3, 1)
        dist = torch.minimum(dist, ((pt - centre) ** 2).sum(1))  # masked stay at -1
        best, last = dist.max(1)
        indices.append(last)
        repeats.append(best <= 0.0)
    return torch.stack(indices, 1), torch.stack(repeats, 1)


def knn_group(points: Tensor, mask: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` nearest real points of each centre.

    Where a cloud has fewer than ``k`` real points, the missing neighbours are the nearest one
    (the centre itself), which leaves a max-pool unchanged.

    Args:
        points: (B, P, 3); mask: (B, P) bool; centres: (B, G, 3); k: neighbours.

    Returns:
        idx: (B, G, k) int64 indices into P.
    """
    # |c - p|^2 = |c|^2 + |p|^2 - 2 c.p in one batched matmul-add instead of a (B, G, P, 3) difference
    # tensor; padded points get |p|^2 = 1e10, so they rank last and are recognised below.
    sq = (points**2).sum(-1)
    sq = torch.where(mask, sq, torch.full_like(sq, 1e10))
    d2 = torch.baddbmm(sq.unsqueeze(1) + (centres**2).sum(-1, keepdim=True), centres, points.transpose(1, 2), alpha=-2.0)
    dists, idx = torch.topk(d2, k, dim=-1, largest=False)
    return torch.where(dists < 1e9, idx, idx[..., :1])


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Shared per-point MLP: Linear → LayerNorm → GELU for each step (LayerNorm: no batch statistics,
    so padding and batch composition never change a token)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(c_in, c_out), nn.LayerNorm(c_out), nn.GELU()]
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """One PointNet++ set-abstraction level: FPS centres → kNN groups → shared MLP → max-pool.

    Args:
        num_groups: G centres.
        group_size: k neighbours per centre.
        in_features: per-point feature channels carried in (0 = coordinates only).
        widths: MLP output widths.
        local_scale: local coordinates ``(p - centre) / local_scale`` (metres).

    Shapes:
        forward: points (B, N, 3), mask (B, N), features (B, N, C) or None →
        centres (B, G, 3), features (B, G, widths[-1]), repeat (B, G) bool.
    """

    def __init__(self, num_groups: int, group_size: int, in_features: int, widths: Sequence[int], local_scale: float) -> None:
        super().__init__()
        if num_groups < 1 or group_size < 1 or not widths or local_scale <= 0:
            raise ValueError(f"bad set abstraction: num_groups={num_groups}, group_size={group_size}, widths={widths}, local_scale={local_scale}")
        self.num_groups = num_groups
        self.group_size = group_size
        self.in_features = in_features
        self.local_scale = float(local_scale)
        self.mlp = _mlp([3 + in_features, *widths])
        self.out_features = int(widths[-1])

    def forward(self, points: Tensor, mask: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if points.shape[1] < self.group_size:
            raise ValueError(f"group_size {self.group_size} exceeds the {points.shape[1]} points per cloud")
        centre_idx, repeat = farthest_point_sample(points, mask, self.num_groups)
        centres = _gather_points(points, centre_idx)  # (B, G, 3)
        nbr = knn_group(points, mask, centres, self.group_size)  # (B, G, k)
        local = (_gather_points(points, nbr) - centres.unsqueeze(2)) * (1.0 / self.local_scale)
        if features is not None:
            local = torch.cat([local, _gather_points(features, nbr)], dim=-1)
        pooled = self.mlp(local).amax(dim=2)  # (B, G, C)
        return centres, pooled, repeat


class PointEncoder(nn.Module):
    """PointNet++-style encoder: one or more set-abstraction levels, then a projection to ``embed_dim``.

    Args:
        embed_dim: token width D.
        num_groups: centres per level (the last level's G is the token count); non-increasing.
        group_sizes: kNN neighbours per level.
        widths: MLP widths per level.
        local_scales: per level, metres that map to 1 in local coordinates (a group of ``k``
            neighbours spans about this far). Level 1 sees raw points, later levels the previous
            level's centres, hence larger scales.
        in_features: per-point features (e.g. 3 for normals) given to ``forward``; 0 = none.

    Shapes:
        forward: points (B, P, 3) float metres (sensor frame), point_mask (B, P) bool True = real,
        features (B, P, in_features) or None → :class:`EncoderOutput` with tokens (B, G, D),
        positions (B, G, 3) = group centres in metres (sensor frame), padding_mask (B, G) True
        for groups that repeat an earlier centre (fewer distinct real points than G).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        num_groups: Sequence[int] = (128, 32),
        group_sizes: Sequence[int] = (32, 16),
        widths: Sequence[Sequence[int]] = ((64, 64, 128), (128, 128, 256)),
        local_scales: Sequence[float] = (0.02, 0.08),
        in_features: int = 0,
    ) -> None:
        super().__init__()
        n = len(num_groups)
        if not n or not (len(group_sizes) == len(widths) == len(local_scales) == n):
            raise ValueError("num_groups, group_sizes, widths and local_scales need one entry per level")
        if any(b > a for a, b in zip(num_groups[:-1], num_groups[1:])):
            raise ValueError(f"num_groups must not increase from level to level, got {list(num_groups)}")
        if any(k > g for g, k in zip(num_groups[:-1], group_sizes[1:])):
            raise ValueError(f"a level's group_size cannot exceed the previous level's num_groups: {list(num_groups)}, {list(group_sizes)}")
        self.embed_dim = embed_dim
        self.in_features = in_features
        levels, c = [], in_features
        for g, k, w, s in zip(num_groups, group_sizes, widths, local_scales):
            levels.append(SetAbstraction(int(g), int(k), c, list(w), float(s)))
            c = levels[-1].out_features
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, embed_dim)

    @property
    def num_tokens(self) -> int:
        return self.levels[-1].num_groups

    def forward(self, points: Tensor, point_mask: Tensor, features: Tensor | None = None) -> EncoderOutput:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"PointEncoder expects points (B, P, 3), got shape {tuple(points.shape)}")
        if (features is None) != (self.in_features == 0) or (features is not None and features.shape[-1] != self.in_features):
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"PointEncoder was built for in_features={self.in_features}, got features {got}")
        mask = point_mask.to(torch.bool)
        m3 = mask.unsqueeze(-1)
        x = torch.where(m3, points.float(), torch.zeros_like(points, dtype=torch.float32))  # garbage/NaN padding → 0
        feats = None if features is None else torch.where(m3, features.float(), torch.zeros_like(features, dtype=torch.float32))
        # Work around the cloud's centroid (float32 precision of squared distances); positions go back to the sensor frame.
        m = mask.to(x.dtype).unsqueeze(-1)
        origin = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
        x = torch.where(m3, x - origin, torch.zeros_like(x))
        valid = mask
        for level in self.levels:  # later levels group the previous level's distinct centres
            x, feats, repeat = level(x, valid, feats)
            valid = ~repeat
        tokens = self.proj(self.norm(feats))
        return EncoderOutput(tokens, x + origin, repeat)


class PlainPointNet(nn.Module):
    """Baseline: shared MLP on every point + global max-pool over the real points (PointNet, no grouping).

    Args:
        embed_dim: token width D.
        widths: MLP widths.
        local_scale: coordinates relative to the cloud centroid are divided by this (metres).
        in_features: per-point features given to ``forward``; 0 = none.

    Shapes:
        forward: points (B, P, 3), point_mask (B, P), features (B, P, F) or None →
        :class:`EncoderOutput` with one token: tokens (B, 1, D), positions (B, 1, 3) = the
        centroid in metres, padding_mask (B, 1) True for a cloud without real points.
    """

    def __init__(self, embed_dim: int = 192, widths: Sequence[int] = (64, 128, 256), local_scale: float = 0.1, in_features: int = 0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.in_features = in_features
        self.local_scale = float(local_scale)
        self.mlp = _mlp([3 + in_features, *widths])
        self.proj = nn.Linear(widths[-1], embed_dim)

    def forward(self, points: Tensor, point_mask: Tensor, features: Tensor | None = None) -> EncoderOutput:
        mask = point_mask.to(torch.bool)
        m3 = mask.unsqueeze(-1)
        x = torch.where(m3, points.float(), torch.zeros_like(points, dtype=torch.float32))
        m = mask.to(x.dtype).unsqueeze(-1)
        n = m.sum(1, keepdim=True)
        centroid = (x * m).sum(1, keepdim=True) / n.clamp(min=1.0)
        h = (x - centroid) * (1.0 / self.local_scale)
        if features is not None:
            h = torch.cat([h, torch.where(m3, features.float(), torch.zeros_like(features, dtype=torch.float32))], dim=-1)
        h = self.mlp(h)
        h = torch.where(m3, h, torch.full_like(h, -1e4)).amax(dim=1, keepdim=True)
        h = torch.where(n > 0.5, h, torch.zeros_like(h))
        return EncoderOutput(self.proj(h), centroid, (n < 0.5).squeeze(-1))
