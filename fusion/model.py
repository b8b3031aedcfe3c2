"""InspectionModel: the pure ``nn.Module`` (encoders → fusion → heads). No optimizers, no logging."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.grading_head import GradingHead
from lineside.vision.image_encoder import ImageEncoder

__all__ = ["InspectionOutput", "InspectionModel"]


class InspectionOutput(NamedTuple):
    """Raw model outputs.

    Attributes:
        grade_logits: (B, K) severity grade logits.
    """

    grade_logits: Tensor


class InspectionModel(nn.Module):
    """Image encoder + fusion transformer + grading head.

    Args:
        image_encoder: turns images into tokens.
        fusion: fuses the tokens of all modalities with the task queries.
        grading_head: severity grade logits.

    Shapes:
        forward: image (B, C, H, W) uint8/float in 0..255 → :class:`InspectionOutput`.
    """

    def __init__(self, image_encoder: ImageEncoder, fusion: FusionTransformer, grading_head: GradingHead) -> None:
        super().__init__()
        if image_encoder.embed_dim != fusion.embed_dim:
            raise ValueError(f"image_encoder.embed_dim={image_encoder.embed_dim} != fusion.embed_dim={fusion.embed_dim}")
        self.image_encoder = image_encoder
        self.fusion = fusion
        self.grading_head = grading_head

    @property
    def num_grades(self) -> int:
        return self.grading_head.num_grades

    @property
    def in_chans(self) -> int:
        return self.image_encoder.in_chans

    def forward(self, image: Tensor) -> InspectionOutput:
        fused = self.fusion({"image": self.image_encoder(image)})
        return InspectionOutput(self.grading_head(fused))
