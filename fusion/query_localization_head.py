"""QueryLocalizationHead: query-based (DETR-style) defect localization on the fused image tokens.

The alternative to the CenterNet head of :mod:`lineside.fusion.localization_head`, with the same
inputs (the fused image tokens and the image :class:`EncoderOutput`) and, after decoding, the same
outputs (``boxes``, ``box_scores``, ``box_labels``, ``defect_heatmap``), so
:class:`~lineside.fusion.lightning_module.InspectionModule` trains, validates and tests either
kind through one code path (each head provides its ``criterion(stride)`` and
``decoder(stride, train_size, …)`` factories).

DETR's split (one concept per file): this head returns a raw
:class:`~lineside.fusion.query_localization_output.QueryLocalizationOutput`;
:mod:`lineside.fusion.hungarian_matcher` matches queries to boxes,
:mod:`lineside.fusion.query_localization_criterion` holds the set losses,
:mod:`lineside.fusion.query_box_decoder` the fixed-shape top-K decoding and
:mod:`lineside.fusion.box_ops` the box helpers. Their names are re-exported here.

Recipe (what makes a DETR trainable in a few thousand steps on small data):

- **Two-stage query selection** (Deformable DETR two-stage, DINO, RT-DETR): every fused image
  token (all feature levels) predicts class logits and a box relative to its own anchor (its cell
  centre, side ``anchor_scale · 2^level`` of the image); the ``num_queries`` best tokens become
  the decoder's reference boxes and (detached) content queries. These token predictions are
  trained with the same matched losses (``…_enc``).
- **Anchor-box queries with iterative refinement** (DAB-DETR, Deformable DETR): each decoder
  layer attends with a positional query computed from its current reference box (sine embedding
  of ``(cx, cy, w, h)`` → MLP, the same MLP that embeds the token centres/sizes for the keys) and
  refines the box by a delta in inverse-sigmoid space.
- **Sigmoid focal classification** (no "no-object" class) and auxiliary losses on every decoder
  layer (``…_0``, ``…_1`` …).

The class-agnostic defect heatmap comes from a light conv branch on the fused tokens of
``level_index`` (as the CenterNet head's ``defect`` map): BCE against the mask's cell coverage
where a mask exists, else against the coverage of each cell by the union of the boxes.

Box convention: ``boxes`` are normalised ``(cx, cy, w, h)`` in [0, 1] of the model input;
targets come as xyxy model-input pixels (the padded detection batch) and are normalised by the
batch's image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lineside.fusion.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, inverse_sigmoid
from lineside.fusion.box_targets import box_coverage
from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.hungarian_matcher import hungarian_match
from lineside.fusion.image_levels import Levels, image_span, level_slice
from lineside.fusion.localization_head import HEATMAP_PRIOR_BIAS, _branch
from lineside.fusion.query_box_decoder import QueryBoxDecoder
from lineside.fusion.query_localization_criterion import LOSSES, QueryLocalizationCriterion
from lineside.fusion.query_localization_output import QueryLocalizationOutput

__all__ = [
    "QueryLocalizationOutput",
    "QueryLocalizationHead",
    "CLASS_PRIOR_BIAS",
    "sine_embedding",
    # re-exported from the files split off this one, so older imports keep working
    "QueryLocalizationCriterion",
    "LOSSES",
    "QueryBoxDecoder",
    "hungarian_match",
    "box_coverage",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "inverse_sigmoid",
]

CLASS_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: sigmoid ≈ 0.01 at start


def sine_embedding(x: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """(…, k) coordinates in [0, 1] → (…, k · num_feats) sine/cosine features (DETR's, per coordinate)."""
    dim_t = torch.arange(num_feats // 2, device=x.device, dtype=torch.float32)
    dim_t = temperature ** (2 * dim_t / num_feats)
    pos = x.float().unsqueeze(-1) * (2 * math.pi) / dim_t  # (…, k, F/2)
    return torch.cat([pos.sin(), pos.cos()], -1).flatten(-2)


def _mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = inp
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


class _DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention of the queries, cross-attention to the image
    tokens (positional query/keys added to queries and keys, not values), feed-forward."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0]))
        return self.norm3(tgt + self.drop(self.ff(tgt)))


class QueryLocalizationHead(nn.Module):
    """Object queries → a small transformer decoder over the fused image tokens → class logits and
    normalised boxes per query, plus a class-agnostic defect heatmap.

    Args:
        embed_dim: D of the fusion transformer.
        num_classes: defect classes C.
        num_queries: object queries Q (fixed; at most the number of image tokens with ``two_stage``).
        num_layers: decoder layers L (each one refines the boxes and is supervised).
        num_heads: attention heads.
        mlp_ratio: feed-forward width of the decoder layers, relative to D.
        dropout: dropout inside the decoder layers.
        level_index: image feature level (index into ``EncoderOutput.levels``, finest first) of the
            defect heatmap; the decoder attends to the tokens of every level.
        two_stage: select the reference boxes and content queries from the image tokens' own
            predictions (else learned queries and reference boxes).
        anchor_scale: side of a level-0 token's anchor box, as a fraction of the image (doubles per level).

    Shapes:
        forward: :class:`FusionOutput` (tokens (B, L, D), ``spans["image"]``) and the image
        ``EncoderOutput`` (``positions`` (B, T, 2) (y, x) in [0, 1], ``levels``) →
        :class:`QueryLocalizationOutput`.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        num_classes: int = 6,
        num_queries: int = 60,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        level_index: int = 0,
        two_stage: bool = True,
        anchor_scale: float = 0.05,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        d = embed_dim
        self.embed_dim, self.num_classes, self.num_queries = d, num_classes, num_queries
        self.num_layers, self.level_index, self.two_stage, self.anchor_scale = num_layers, level_index, two_stage, anchor_scale
        self.memory_proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.pos_feats = max(16, (d // 4) // 2 * 2)
        self.pos_mlp = _mlp(4 * self.pos_feats, d, d)  # shared by the token keys and the query anchors
        self.layers = nn.ModuleList(_DecoderLayer(d, num_heads, int(d * mlp_ratio), dropout) for _ in range(num_layers))
        self.class_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(_mlp(d, d, 4, 3) for _ in range(num_layers))
        for cls, box in zip(self.class_heads, self.box_heads):
            nn.init.constant_(cls.bias, CLASS_PRIOR_BIAS)
            nn.init.zeros_(box[-1].weight)
            nn.init.zeros_(box[-1].bias)
        if two_stage:
            self.enc_class = nn.Linear(d, num_classes)
            self.enc_box = _mlp(d, d, 4, 3)
            nn.init.constant_(self.enc_class.bias, CLASS_PRIOR_BIAS)
            nn.init.zeros_(self.enc_box[-1].weight)
            nn.init.zeros_(self.enc_box[-1].bias)
            self.content_proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        else:
            self.query_content = nn.Embedding(num_queries, d)
            self.query_anchor = nn.Embedding(num_queries, 4)
            side = math.ceil(math.sqrt(num_queries))
            g = (torch.arange(num_queries, dtype=torch.float32) % side + 0.5) / side, (torch.arange(num_queries) // side + 0.5) / side
            init = torch.stack([g[0], g[1].float(), torch.full((num_queries,), 0.1), torch.full((num_queries,), 0.1)], -1)
            with torch.no_grad():
                self.query_anchor.weight.copy_(inverse_sigmoid(init))
        self.defect = _branch(d, 1, HEATMAP_PRIOR_BIAS)

    # ---------------------------------------------------------------- factories (InspectionModule, export)

    def criterion(self, stride: float | None = None) -> QueryLocalizationCriterion:
        """The default criterion for this head (``stride`` is unused: boxes are matched, not gridded)."""
        return QueryLocalizationCriterion(self.num_classes)

    def decoder(self, stride: float, train_size: Sequence[int], input_size: Sequence[int] | None = None,
                top_k: int = 100, tta_views: int = 1) -> QueryBoxDecoder:
        """A fixed-shape decoder of this head's outputs (top-K over Q·C query-class pairs)."""
        return QueryBoxDecoder(stride, train_size, input_size, min(top_k, self.num_queries * self.num_classes), tta_views)

    # ---------------------------------------------------------------- forward

    def _image_tokens(self, fused: FusionOutput, image) -> tuple[Tensor, Levels, tuple[int, int, int]]:
        """The fused image tokens (B, T, D), the level grids and ``(first, h, w)`` of ``level_index``."""
        start, end, levels = image_span(fused, image)
        heatmap_level = level_slice(levels, self.level_index)
        if self.two_stage and self.num_queries > end - start:
            raise ValueError(f"num_queries={self.num_queries} exceeds the {end - start} image tokens two-stage selection picks from")
        return fused.tokens[:, start:end], levels, heatmap_level

    def _token_anchors(self, positions: Tensor, levels: Levels) -> Tensor:
        """(B, T, 4) anchor boxes ``(cx, cy, w, h)`` of the image tokens: cell centre, level-scaled side."""
        sides = torch.cat([torch.full((h * w,), self.anchor_scale * 2.0**i, device=positions.device)
                           for i, (h, w) in enumerate(levels)])
        sides = sides.clamp(max=0.9).view(1, -1, 1).expand(positions.shape[0], -1, 2)
        yx = positions.float()
        return torch.cat([yx[..., 1:2], yx[..., 0:1], sides], -1)

    def forward(self, fused: FusionOutput, image) -> QueryLocalizationOutput:
        tokens, levels, (first, h, w) = self._image_tokens(fused, image)
        b = tokens.shape[0]
        memory = self.memory_proj(tokens)
        anchors = self._token_anchors(image.positions, levels)
        memory_pos = self.pos_mlp(sine_embedding(anchors, self.pos_feats))
        if self.two_stage:
            enc_logits = self.enc_class(memory)
            enc_boxes = (self.enc_box(memory) + inverse_sigmoid(anchors)).sigmoid()
            top = enc_logits.detach().amax(-1).topk(self.num_queries, dim=1).indices  # (B, Q)
            ref = enc_boxes.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, 4))
            tgt = self.content_proj(memory.detach().gather(1, top.unsqueeze(-1).expand(-1, -1, memory.shape[-1])))
        else:
            c = self.num_classes
            enc_logits, enc_boxes = memory.new_zeros(b, 0, c), memory.new_zeros(b, 0, 4)
            ref = self.query_anchor.weight.sigmoid().unsqueeze(0).expand(b, -1, -1)
            tgt = self.query_content.weight.unsqueeze(0).expand(b, -1, -1)
        all_logits, all_boxes = [], []
        for layer, cls_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            query_pos = self.pos_mlp(sine_embedding(ref, self.pos_feats))
            tgt = layer(tgt, query_pos, memory, memory_pos)
            boxes = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
            all_logits.append(cls_head(tgt))
            all_boxes.append(boxes)
            ref = boxes.detach()
        grid = tokens[:, first : first + h * w].transpose(1, 2).reshape(b, tokens.shape[-1], h, w)
        aux_logits = torch.stack(all_logits[:-1]) if len(all_logits) > 1 else all_logits[-1].new_zeros(0, *all_logits[-1].shape)
        aux_boxes = torch.stack(all_boxes[:-1]) if len(all_boxes) > 1 else all_boxes[-1].new_zeros(0, *all_boxes[-1].shape)
        return QueryLocalizationOutput(all_logits[-1], all_boxes[-1], self.defect(grid), aux_logits, aux_boxes, enc_logits, enc_boxes)
