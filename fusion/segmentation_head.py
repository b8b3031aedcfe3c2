"""SegmentationHead: dense per-class defect segmentation for thin structures (``lineside.fusion.segmentation_head.SegmentationHead``).

Cracks are 1–3 px wide at 400 px, so a head on stride-16 tokens cannot draw them. This head is an
FPN-style top-down decoder (Panoptic FPN's semantic branch, simplified): it starts from the *fused*
image tokens of one level (default the coarsest: the fusion transformer's context), folds them
into a map and walks down the image encoder's untokenised backbone maps (``ImageEncoder(dense_levels=…)``,
``EncoderOutput.maps``, finest first), adding a 1×1 lateral of each map to the upsampled coarser
map and smoothing with a 3×3 conv. Logits come out at the finest map's stride (4 with
``dense_levels: [1, 2, 3]`` on EfficientNet, 2 with level 0 too).

Class convention: logit channel 0 is background, channel ``c`` is mask value ``c`` (EL cracks:
1 dark area, 2 crossing, 3 crack, 4 busbar). ``structure_classes`` (busbar) are segmented but are
not defects: the class-agnostic defect heatmap is ``1 − p(background) − p(structure)``.

Targets and losses: :mod:`lineside.fusion.segmentation_criterion`; decoding (probabilities,
heatmap): :mod:`lineside.fusion.segmentation_decoder`; task: :mod:`lineside.fusion.tasks.segmentation`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.image_levels import level_tokens

__all__ = ["EL_SEGMENTATION_CLASSES", "SegmentationHead", "SegmentationOutput"]

EL_SEGMENTATION_CLASSES = ("dark_area", "crossing", "crack", "busbar")  # mask values 1..4


class SegmentationOutput(NamedTuple):
    """Raw segmentation output.

    Attributes:
        logits: (B, K + 1, h, w) per-class logits (channel 0 background) at the head's stride
            (the finest ``EncoderOutput.maps`` level).
    """

    logits: Tensor


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(16, c_out), c_out), nn.GELU())


class SegmentationHead(nn.Module):
    """Fused image tokens of one level + the encoder's backbone maps → per-class logits at stride 4 (or 2).

    Args:
        embed_dim: D of the fusion transformer.
        in_channels: channels of ``EncoderOutput.maps``, finest first (``ImageEncoder.map_channels``;
            EfficientNet-Lite0 levels 0..4: 16, 24, 40, 112, 320). The model checks them.
        num_classes: foreground classes K (mask values 1..K); logits have K + 1 channels.
        class_names: the K foreground class names (default the EL cell classes for K = 4, else
            ``class1`` …).
        structure_classes: names among ``class_names`` that are structure, not defects (left out
            of the defect heatmap).
        thin_classes: names whose pixels are scored with a distance tolerance (crack F1@2px).
        level_index: which fused image token level starts the top-down path (-1 = coarsest).
        decoder_dim: channels of the top-down path.

    Shapes:
        forward: :class:`FusionOutput` and the image ``EncoderOutput`` (``levels``, ``maps`` (B, C_l,
        H/s_l, W/s_l) finest first) → :class:`SegmentationOutput` with logits (B, K + 1, H/s_0, W/s_0).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        in_channels: Sequence[int] = (24, 40, 112),
        num_classes: int = 4,
        class_names: Sequence[str] | None = None,
        structure_classes: Sequence[str] = ("busbar",),
        thin_classes: Sequence[str] = ("crack",),
        level_index: int = -1,
        decoder_dim: int = 64,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("SegmentationHead needs the encoder's backbone maps: set ImageEncoder dense_levels and in_channels")
        if class_names is None:
            class_names = EL_SEGMENTATION_CLASSES if num_classes == len(EL_SEGMENTATION_CLASSES) else [f"class{i + 1}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names {list(class_names)} must name the {num_classes} foreground classes")
        self.embed_dim, self.num_classes, self.level_index = embed_dim, num_classes, level_index
        self.in_channels = [int(c) for c in in_channels]
        self.class_names = [str(n) for n in class_names]
        self.structure_classes = [n for n in structure_classes if n in self.class_names]
        self.thin_classes = [n for n in thin_classes if n in self.class_names]
        self.top = nn.Conv2d(embed_dim, decoder_dim, 1)
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder_dim, 1) for c in self.in_channels)
        self.smooth = nn.ModuleList(_conv_block(decoder_dim, decoder_dim) for _ in self.in_channels)
        self.classifier = nn.Conv2d(decoder_dim, num_classes + 1, 1)
        # defect channels of the softmax: not background, not structure (constant, travels with the graph)
        weight = torch.tensor([0.0] + [0.0 if n in self.structure_classes else 1.0 for n in self.class_names])
        self.register_buffer("defect_weight", weight.view(1, -1, 1, 1), persistent=False)

    @property
    def defect_classes(self) -> list[int]:
        """Mask values of the defect classes (foreground, not structure)."""
        return [i + 1 for i, n in enumerate(self.class_names) if n not in self.structure_classes]

    @property
    def thin_class_indices(self) -> list[int]:
        return [self.class_names.index(n) + 1 for n in self.thin_classes]

    def forward(self, fused: FusionOutput, image) -> SegmentationOutput:
        maps = tuple(image.maps)
        if len(maps) != len(self.lateral) or any(int(m.shape[1]) != c for m, c in zip(maps, self.in_channels)):
            raise ValueError(f"SegmentationHead expects encoder maps with channels {self.in_channels}, got "
                             f"{[int(m.shape[1]) for m in maps]}: match ImageEncoder dense_levels and the head's in_channels")
        tokens, h, w = level_tokens(fused, image, self.level_index)
        x = self.top(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))
        for i in range(len(maps) - 1, -1, -1):  # coarse → fine
            m = maps[i]
            x = F.interpolate(x, size=(int(m.shape[-2]), int(m.shape[-1])), mode="bilinear", align_corners=False)
            x = self.smooth[i](x + self.lateral[i](m.float().contiguous()))
        return SegmentationOutput(self.classifier(x))
