"""LocalizationHead: CenterNet-style dense defect localization on the fused image tokens.

The head reads the fused tokens of one image feature level back into a (B, D, h, w) map and
predicts, per cell, a centre heatmap per class, the box size, the sub-cell offset of the box
centre and a class-agnostic defect heatmap. It returns raw outputs only; targets and losses live
in :mod:`lineside.fusion.localization_criterion`, decoding in :mod:`lineside.fusion.box_decoder`.

Conventions shared by head, criterion and decoder (``s`` = the level's stride in model-input
pixels, boxes xyxy pixel-edge coordinates):

- cell ``(i, j)`` covers pixels ``[j·s, (j+1)·s) × [i·s, (i+1)·s)``;
- a box with centre ``(cx, cy)`` sits in cell ``(⌊cy/s⌋, ⌊cx/s⌋)`` with offset
  ``(cx/s − ⌊cx/s⌋, cy/s − ⌊cy/s⌋)`` in ``[0, 1)``;
- ``size`` is ``(log w, log h)`` of the box in model-input pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.image_levels import level_tokens

__all__ = ["LocalizationOutput", "LocalizationHead", "HEATMAP_PRIOR_BIAS"]

HEATMAP_PRIOR_BIAS = -2.19  # CenterNet: sigmoid(-2.19) ≈ 0.1, so the focal loss starts stable


class LocalizationOutput(NamedTuple):
    """Raw localization outputs on an (h, w) grid of one image feature level.

    Attributes:
        heatmap: (B, C, h, w) per-class centre heatmap logits.
        size: (B, 2, h, w) ``(log w, log h)`` of the box centred in each cell, model-input pixels.
        offset: (B, 2, h, w) ``(dx, dy)`` sub-cell offset of the centre, in cells (target in [0, 1)).
        defect: (B, 1, h, w) class-agnostic defect heatmap logits (trained on masks, else boxes).
    """

    heatmap: Tensor
    size: Tensor
    offset: Tensor
    defect: Tensor


def _branch(hidden: int, out: int, bias: float = 0.0) -> nn.Sequential:
    last = nn.Conv2d(hidden, out, kernel_size=1)
    nn.init.normal_(last.weight, std=0.01)
    nn.init.constant_(last.bias, bias)
    return nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True), last)


class LocalizationHead(nn.Module):
    """Fused image tokens of one level → a conv tower → heatmap / size / offset / defect maps.

    Args:
        embed_dim: D of the fusion transformer.
        num_classes: defect classes C.
        level_index: which configured image feature level (index into ``EncoderOutput.levels``,
            ordered finest first, as ``ImageEncoder.strides``); 0 = the finest. Stride 8 or 16 suits
            small defects.
        hidden: channels of the conv tower (default ``embed_dim``).
        num_convs: 3×3 conv + GroupNorm + GELU blocks in the shared tower.
        size_prior: box side (model-input pixels) the size branch starts at.
        in_channels: channels of the image encoder's backbone maps (``ImageEncoder(dense_levels=…)``,
            ``EncoderOutput.maps``, finest first; ``ImageEncoder.map_channels``) for a multi-scale
            grid: the fused tokens of ``level_index`` walk down those maps FPN-style (upsample, add a
            1×1 lateral of the map) before the tower, so the head predicts on the finest map's grid
            (stride ``ImageEncoder.map_strides[0]``, e.g. 8 with ``dense_levels: [2]`` on
            EfficientNet) with the fused context of the coarser level. () = the level's own grid.

    Shapes:
        forward: :class:`FusionOutput` (tokens (B, L, D), ``spans["image"] = (start, end)``) and the
        image :class:`EncoderOutput` (``levels`` = ((h, w), …)) → :class:`LocalizationOutput` with
        heatmap (B, C, h, w), size (B, 2, h, w), offset (B, 2, h, w), defect (B, 1, h, w), where
        (h, w) = ``levels[level_index]`` (with ``in_channels``: the finest map's (H/s, W/s)).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        num_classes: int = 6,
        level_index: int = 0,
        hidden: int | None = None,
        num_convs: int = 2,
        size_prior: float = 32.0,
        in_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        hidden = hidden or embed_dim
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.level_index = level_index
        layers: list[nn.Module] = []
        c = embed_dim
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.GroupNorm(math.gcd(32, hidden), hidden), nn.GELU()]
            c = hidden
        self.tower = nn.Sequential(*layers)
        self.in_channels = [int(ch) for ch in in_channels]
        if self.in_channels:  # only then: single-level heads keep their parameters (and checkpoints)
            self.lateral = nn.ModuleList(nn.Conv2d(ch, embed_dim, kernel_size=1) for ch in self.in_channels)
        self.heatmap = _branch(c, num_classes, HEATMAP_PRIOR_BIAS)
        self.size = _branch(c, 2, math.log(size_prior))
        self.offset = _branch(c, 2, 0.5)
        self.defect = _branch(c, 1, HEATMAP_PRIOR_BIAS)

    def level_tokens(self, fused: FusionOutput, image) -> tuple[Tensor, int, int]:
        """The fused tokens of ``level_index``: ((B, h·w, D), h, w)."""
        return level_tokens(fused, image, self.level_index)

    def grid_stride(self, image_encoder) -> float:
        """Model-input pixels per cell of this head's grid for ``image_encoder`` (an ``ImageEncoder``)."""
        if self.in_channels:
            return float(image_encoder.map_strides[0])
        return float(image_encoder.strides[self.level_index])

    def forward(self, fused: FusionOutput, image) -> LocalizationOutput:
        tokens, h, w = self.level_tokens(fused, image)
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        if self.in_channels:
            maps = tuple(image.maps)
            if len(maps) != len(self.in_channels) or any(int(m.shape[1]) != ch for m, ch in zip(maps, self.in_channels)):
                raise ValueError(f"LocalizationHead expects encoder maps with channels {self.in_channels}, got "
                                 f"{[int(m.shape[1]) for m in maps]}: match ImageEncoder dense_levels and the head's in_channels")
            for m, lateral in zip(reversed(maps), reversed(self.lateral)):  # coarse → fine
                x = F.interpolate(x, size=(int(m.shape[-2]), int(m.shape[-1])), mode="bilinear", align_corners=False)
                x = x + lateral(m.float().contiguous())
        x = self.tower(x)
        return LocalizationOutput(self.heatmap(x), self.size(x), self.offset(x), self.defect(x))
