"""GraspHead: fused point tokens → one parallel-jaw 6-DoF grasp proposal per point group (raw outputs).

Each point token sits at its group centre (``EncoderOutput.positions`` of the point encoder, in the
normalised frame the dataset feeds the encoder). Per token the head predicts a graspability logit,
an offset from the group centre to the grasp centre, an approach direction, a closing direction
(Gram-Schmidt orthogonalised to the approach) and a gripper width. Decoding (top-K with 3-D NMS,
back to sensor metres) is :class:`~lineside.fusion.grasp_decoder.GraspDecoder`; losses are
:class:`~lineside.fusion.grasp_criterion.GraspCriterion`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.pointcloud.point_encoder import EncoderOutput

__all__ = ["GraspHead", "GraspOutput", "orthonormal_grasp_axes"]


class GraspOutput(NamedTuple):
    """Raw grasp proposals, one per point token, normalised frame.

    Attributes:
        logits: (B, G) graspability logits.
        position: (B, G, 3) grasp centres = group centre + predicted offset.
        approach: (B, G, 3) unit approach directions (palm → fingertips).
        closing: (B, G, 3) unit closing directions, ⊥ approach (sign is arbitrary).
        width: (B, G) gripper opening (> 0), normalised units (metres / scale).
        centres: (B, G, 3) the group centres the proposals belong to.
        padding_mask: (B, G) bool, True where the token is padding (no proposal).
    """

    logits: Tensor
    position: Tensor
    approach: Tensor
    closing: Tensor
    width: Tensor
    centres: Tensor
    padding_mask: Tensor


def orthonormal_grasp_axes(approach_raw: Tensor, closing_raw: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(…, 3) raw vectors → unit approach and unit closing ⊥ approach (Gram-Schmidt).

    Where the raw closing is (nearly) parallel to the approach, a fixed helper axis takes its place,
    so the result stays finite and orthogonal.
    """
    a = F.normalize(approach_raw, dim=-1, eps=eps)
    c = closing_raw - (closing_raw * a).sum(-1, keepdim=True) * a
    # fallback: a helper axis ⊥ a (x unless a is near x, then y), used where c vanished
    ex = a.new_tensor([1.0, 0.0, 0.0]).expand_as(a)
    ey = a.new_tensor([0.0, 1.0, 0.0]).expand_as(a)
    helper = torch.where(a[..., :1].abs() < 0.9, ex, ey)
    h = helper - (helper * a).sum(-1, keepdim=True) * a
    small = c.norm(dim=-1, keepdim=True) < eps
    c = torch.where(small, h, c)
    return a, F.normalize(c, dim=-1, eps=eps)


class GraspHead(nn.Module):
    """Per point token: graspability, centre offset, approach, closing, width.

    Args:
        embed_dim: fused token width D.
        hidden_dim: MLP hidden width (default D).
        num_layers: hidden layers of the shared MLP.
        offset_scale: the offset is ``offset_scale * tanh(raw)`` (normalised units), so a proposal
            stays near its group.
        init_prior: initial graspability probability (bias of the logit, as in focal-loss detectors).

    Shapes:
        forward: fused :class:`FusionOutput` (tokens (B, L, D), with ``spans["points"]`` = (start, end)
        of the G point tokens), points :class:`EncoderOutput` (positions (B, G, 3)) → :class:`GraspOutput`.
    """

    def __init__(self, embed_dim: int = 192, hidden_dim: int | None = None, num_layers: int = 2, offset_scale: float = 0.5, init_prior: float = 0.1) -> None:
        super().__init__()
        hidden = hidden_dim or embed_dim
        layers: list[nn.Module] = [nn.LayerNorm(embed_dim)]
        c = embed_dim
        for _ in range(num_layers):
            layers += [nn.Linear(c, hidden), nn.GELU()]
            c = hidden
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(c, 11)  # logit 1, offset 3, approach 3, closing 3, width 1
        self.offset_scale = float(offset_scale)
        self.embed_dim = embed_dim
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[0] = float(torch.logit(torch.tensor(init_prior)))
            self.out.bias[4:7] = torch.tensor([0.0, 0.0, 1.0])  # approach starts along +z (away from the camera)
            self.out.bias[7:10] = torch.tensor([1.0, 0.0, 0.0])

    @staticmethod
    def point_tokens(fused: FusionOutput, name: str = "points") -> tuple[Tensor, Tensor]:
        """The (B, G, D) fused tokens and (B, G) padding mask of one modality, via ``fused.spans[name]``."""
        spans = getattr(fused, "spans", None)
        if spans is None or name not in spans:
            raise KeyError(f"GraspHead needs fused.spans[{name!r}] (the point tokens' place in fused.tokens); got spans={spans}")
        start, end = spans[name]
        return fused.tokens[:, start:end], fused.padding_mask[:, start:end]

    def forward(self, fused: FusionOutput, points: EncoderOutput) -> GraspOutput:
        tokens, mask = self.point_tokens(fused)
        centres = points.positions
        if tokens.shape[1] != centres.shape[1]:
            raise ValueError(f"{tokens.shape[1]} fused point tokens but {centres.shape[1]} point-encoder positions")
        return self.predict(tokens, centres, mask)

    def predict(self, tokens: Tensor, centres: Tensor, padding_mask: Tensor) -> GraspOutput:
        """The head on (B, G, D) tokens at (B, G, 3) centres with a (B, G) padding mask."""
        raw = self.out(self.mlp(tokens))
        approach, closing = orthonormal_grasp_axes(raw[..., 4:7], raw[..., 7:10])
        position = centres + self.offset_scale * torch.tanh(raw[..., 1:4])
        width = F.softplus(raw[..., 10])
        return GraspOutput(raw[..., 0], position, approach, closing, width, centres, padding_mask.to(torch.bool))
