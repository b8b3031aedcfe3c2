"""FusionTransformer: one transformer over the tokens of every modality plus task queries."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lineside.vision.image_encoder import EncoderOutput

__all__ = ["FusionOutput", "FusionTransformer"]


class FusionOutput(NamedTuple):
    """Fused sequence.

    Attributes:
        queries: (B, Q, D) task-query outputs (query 0 = grading).
        tokens: (B, L, D) fused modality tokens (all modalities concatenated in name order).
        padding_mask: (B, L) bool, True where a token is padding.
        spans: modality name → (start, end) of its tokens inside ``tokens`` (present modalities only).
    """

    queries: Tensor
    tokens: Tensor
    padding_mask: Tensor
    spans: dict = {}


class FusionTransformer(nn.Module):
    """Pre-norm transformer encoder over ``[task queries; tokens of each modality]``.

    Each modality gets a learned modality embedding and a position embedding from its own
    positions (an MLP of (y, x) for images, (x, y, z) for points); padding masks carry missing
    tokens and whole missing modalities through attention.

    Args:
        embed_dim: token width D (must match the encoders).
        depth: number of transformer layers.
        num_heads: attention heads.
        mlp_ratio: hidden width of the feed-forward block, relative to D.
        dropout: dropout inside the layers.
        modalities: modality name → position dimensionality, e.g. ``{"image": 2}``.
        num_queries: task query tokens.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        modalities: dict[str, int] | None = None,
        num_queries: int = 1,
    ) -> None:
        super().__init__()
        modalities = modalities or {"image": 2}
        self.embed_dim = embed_dim
        self.modality_names = sorted(modalities)
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(embed_dim)) for m in self.modality_names})
        self.position_embed = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(p, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim)) for m, p in modalities.items()}
        )
        self.queries = nn.Parameter(torch.zeros(num_queries, embed_dim))
        for p in [*self.modality_embed.values(), self.queries]:
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, inputs: dict[str, EncoderOutput]) -> FusionOutput:
        """inputs: modality name → :class:`EncoderOutput` (tokens (B, L_m, D)); absent modalities are skipped."""
        unknown = set(inputs) - set(self.modality_names)
        if unknown:
            raise KeyError(f"FusionTransformer has no embedding for modalities {sorted(unknown)}; configured: {self.modality_names}")
        tokens, masks, spans, start = [], [], {}, 0
        for name in self.modality_names:
            if name not in inputs:
                continue
            out = inputs[name]
            tokens.append(out.tokens + self.modality_embed[name] + self.position_embed[name](out.positions))
            masks.append(out.padding_mask)
            spans[name] = (start, start + int(out.tokens.shape[1]))
            start = spans[name][1]
        if not tokens:
            raise ValueError("FusionTransformer got no modality inputs")
        x = torch.cat(tokens, dim=1)
        mask = torch.cat(masks, dim=1)
        b, q = x.shape[0], self.queries.shape[0]
        seq = torch.cat([self.queries.unsqueeze(0).expand(b, -1, -1), x], dim=1)
        full_mask = torch.cat([torch.zeros(b, q, dtype=torch.bool, device=mask.device), mask], dim=1)
        y = self.norm(self.encoder(seq, src_key_padding_mask=full_mask))
        return FusionOutput(y[:, :q], y[:, q:], mask, spans)
