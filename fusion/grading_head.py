"""GradingHead: defect severity logits from the fused sequence, and where on the image they come from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.image_levels import image_span

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
        token_contributions: :class:`FusionOutput` → (B, K, L), each token's share of each logit.
        grade_map: :class:`FusionOutput`, image ``EncoderOutput`` → (B, K, h, w) on the finest image level's grid.
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

    def token_contributions(self, fused: FusionOutput) -> Tensor:
        """Each fused token's additive share of each grade logit (a class-activation map).

        Exact, not a gradient approximation: with the LayerNorm's per-sample mean ``μ`` and scale
        ``σ`` held, the pooled half of the classifier input is ``Σ_i m_i (t_i − μ) / (σ·M)`` over the
        ``M`` unpadded tokens, so ``logit_k = c_k + Σ_i contribution[k, i]``, where ``c_k`` (query
        and biases) is the same for every token. Padding tokens contribute 0.

        Shapes:
            (B, L, D) fused tokens → (B, K, L).
        """
        tokens = fused.tokens
        keep = (~fused.padding_mask).to(tokens.dtype)
        count = keep.sum(1, keepdim=True).clamp_min(1.0)
        pooled = (tokens * keep.unsqueeze(-1)).sum(1) / count
        x = torch.cat([fused.queries[:, self.query_index], pooled], dim=-1)
        mu = x.mean(-1, keepdim=True)
        sigma = (x.var(-1, unbiased=False, keepdim=True) + self.norm.eps).sqrt()
        d = tokens.shape[-1]
        weight = self.fc.weight[:, d:] * self.norm.weight[d:]  # (K, D)
        centred = (tokens - mu.unsqueeze(1)) / sigma.unsqueeze(1)
        return torch.einsum("bld,kd->bkl", centred, weight) * (keep / count).unsqueeze(1)

    def grade_map(self, fused: FusionOutput, image) -> Tensor:
        """:meth:`token_contributions` of the image tokens laid out on the finest image level's grid.

        Coarser levels are resized to that grid (bilinear) and spread over the finer cells they
        cover (divided by the area ratio), so the map still sums to the image tokens' share of
        each logit. Tokens of other modalities (text) are left out.

        Shapes:
            → (B, K, h, w), (h, w) = the level of ``image.levels`` with the most cells.
        """
        start, end, levels = image_span(fused, image)
        contrib = self.token_contributions(fused)[:, :, start:end]
        b, k = contrib.shape[:2]
        h0, w0 = max(levels, key=lambda lvl: lvl[0] * lvl[1])
        out, first = None, 0
        for h, w in levels:
            m = contrib[:, :, first : first + h * w].reshape(b, k, h, w)
            first += h * w
            if (h, w) != (h0, w0):
                m = F.interpolate(m, size=(h0, w0), mode="bilinear", align_corners=False) * (h * w / (h0 * w0))
            out = m if out is None else out + m
        return out
