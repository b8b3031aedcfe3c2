"""GradingHead: defect severity logits from the fused sequence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput

__all__ = ["GradingHead"]


class GradingHead(nn.Module):
    """Severity grade logits from the grading query and a masked mean of the fused tokens.

    Args:
        embed_dim: D of the fusion transformer.
        num_grades: number of grades K (ELPV: 4).
        dropout: dropout before the classifier.
        query_index: which task query is the grading query.

    Shapes:
        forward: :class:`FusionOutput` → logits (B, K).
    """

    def __init__(self, embed_dim: int = 192, num_grades: int = 4, dropout: float = 0.2, query_index: int = 0) -> None:
        super().__init__()
        self.num_grades = num_grades
        self.query_index = query_index
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * embed_dim, num_grades)
        nn.init.zeros_(self.fc.bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)

    def forward(self, fused: FusionOutput) -> Tensor:
        keep = (~fused.padding_mask).unsqueeze(-1).to(fused.tokens.dtype)
        pooled = (fused.tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        x = torch.cat([fused.queries[:, self.query_index], pooled], dim=-1)
        return self.fc(self.drop(self.norm(x)))
