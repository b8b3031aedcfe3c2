"""Query-based (DETR-style) defect localization: head, Hungarian-matched criterion, fixed-shape decoder.

The alternative to the CenterNet head of :mod:`lineside.fusion.localization_head`, with the same
inputs (the fused image tokens and the image :class:`EncoderOutput`) and, after decoding, the same
outputs (``boxes``, ``box_scores``, ``box_labels``, ``defect_heatmap``), so
:class:`~lineside.fusion.lightning_module.InspectionModule` trains, validates and tests either
kind through one code path (each head provides its ``criterion(stride)`` and
``decoder(stride, train_size, …)`` factories).

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
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.localization_head import HEATMAP_PRIOR_BIAS, _branch

if TYPE_CHECKING:
    from lineside.export.deployable import TensorSpec

__all__ = [
    "QueryLocalizationOutput",
    "QueryLocalizationHead",
    "QueryLocalizationCriterion",
    "QueryBoxDecoder",
    "hungarian_match",
    "box_cxcywh_to_xyxy",
    "generalized_box_iou",
]

LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "loss_defect")
CLASS_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: sigmoid ≈ 0.01 at start


class QueryLocalizationOutput(NamedTuple):
    """Raw outputs of :class:`QueryLocalizationHead` (Q queries, T image tokens, L decoder layers).

    Attributes:
        logits: (B, Q, C) per-class logits of the last decoder layer (sigmoid, no "no-object").
        boxes: (B, Q, 4) normalised ``(cx, cy, w, h)`` of the last decoder layer.
        defect: (B, 1, h, w) class-agnostic defect heatmap logits on the ``level_index`` grid.
        aux_logits: (L-1, B, Q, C) logits of the earlier decoder layers.
        aux_boxes: (L-1, B, Q, 4) boxes of the earlier decoder layers.
        enc_logits: (B, T, C) per-token logits of the two-stage query selection ((B, 0, C) without it).
        enc_boxes: (B, T, 4) per-token boxes of the query selection ((B, 0, 4) without it).
    """

    logits: Tensor
    boxes: Tensor
    defect: Tensor
    aux_logits: Tensor
    aux_boxes: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor


# --------------------------------------------------------------------------- box helpers


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    return box_convert(b, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    return box_convert(b, "xyxy", "cxcywh")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


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


# --------------------------------------------------------------------------- head


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

    def criterion(self, stride: float | None = None) -> "QueryLocalizationCriterion":
        """The default criterion for this head (``stride`` is unused: boxes are matched, not gridded)."""
        return QueryLocalizationCriterion(self.num_classes)

    def decoder(self, stride: float, train_size: Sequence[int], input_size: Sequence[int] | None = None,
                top_k: int = 100, tta_views: int = 1) -> "QueryBoxDecoder":
        """A fixed-shape decoder of this head's outputs (top-K over Q·C query-class pairs)."""
        return QueryBoxDecoder(stride, train_size, input_size, min(top_k, self.num_queries * self.num_classes), tta_views)

    # ---------------------------------------------------------------- forward

    def _image_tokens(self, fused: FusionOutput, image) -> tuple[Tensor, Tensor, tuple]:
        start, end = fused.spans["image"]
        levels = tuple(tuple(int(v) for v in lvl) for lvl in image.levels)
        if sum(h * w for h, w in levels) != end - start:
            raise ValueError(f"image span {start}:{end} holds {end - start} tokens, levels {levels} give {sum(h * w for h, w in levels)}")
        if not -len(levels) <= self.level_index < len(levels):
            raise IndexError(f"level_index {self.level_index} out of range for {len(levels)} image feature levels")
        if self.two_stage and self.num_queries > end - start:
            raise ValueError(f"num_queries={self.num_queries} exceeds the {end - start} image tokens two-stage selection picks from")
        return fused.tokens[:, start:end], image.positions, levels

    def _token_anchors(self, positions: Tensor, levels: tuple) -> Tensor:
        """(B, T, 4) anchor boxes ``(cx, cy, w, h)`` of the image tokens: cell centre, level-scaled side."""
        sides = torch.cat([torch.full((h * w,), self.anchor_scale * 2.0**i, device=positions.device)
                           for i, (h, w) in enumerate(levels)])
        sides = sides.clamp(max=0.9).view(1, -1, 1).expand(positions.shape[0], -1, 2)
        yx = positions.float()
        return torch.cat([yx[..., 1:2], yx[..., 0:1], sides], -1)

    def forward(self, fused: FusionOutput, image) -> QueryLocalizationOutput:
        tokens, positions, levels = self._image_tokens(fused, image)
        b = tokens.shape[0]
        memory = self.memory_proj(tokens)
        anchors = self._token_anchors(positions, levels)
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
        h, w = levels[self.level_index % len(levels)]
        first = sum(hh * ww for hh, ww in levels[: self.level_index % len(levels)])
        grid = tokens[:, first : first + h * w].transpose(1, 2).reshape(b, tokens.shape[-1], h, w)
        aux_logits = torch.stack(all_logits[:-1]) if len(all_logits) > 1 else all_logits[-1].new_zeros(0, *all_logits[-1].shape)
        aux_boxes = torch.stack(all_boxes[:-1]) if len(all_boxes) > 1 else all_boxes[-1].new_zeros(0, *all_boxes[-1].shape)
        return QueryLocalizationOutput(all_logits[-1], all_boxes[-1], self.defect(grid), aux_logits, aux_boxes, enc_logits, enc_boxes)


# --------------------------------------------------------------------------- matching and losses


def _focal_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Deformable DETR's focal classification cost: (Q, C) logits, (M,) labels → (Q, M)."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * -F.logsigmoid(-logits)
    pos = alpha * (1 - p) ** gamma * -F.logsigmoid(logits)
    return pos[:, labels] - neg[:, labels]


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor, cost_class: float = 2.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0, focal_alpha: float = 0.25,
                    focal_gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """One sample's optimal one-to-one assignment of predictions to targets
    (``scipy.optimize.linear_sum_assignment`` on class + L1 + GIoU costs).

    Args:
        logits: (Q, C) class logits; boxes: (Q, 4) normalised cxcywh predictions.
        tgt_labels: (M,) int64; tgt_boxes: (M, 4) normalised cxcywh.

    Returns:
        (prediction indices, target indices), each (min(Q, M),) int64, sorted by prediction index.
    """
    from scipy.optimize import linear_sum_assignment

    if tgt_labels.numel() == 0 or logits.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
    c = (cost_class * _focal_cost(logits, tgt_labels, focal_alpha, focal_gamma)
         + cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
         - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
    c = torch.nan_to_num(c.cpu(), nan=1e6, posinf=1e6, neginf=-1e6).numpy()
    rows, cols = linear_sum_assignment(c)
    order = np.argsort(rows)
    return torch.as_tensor(rows[order], dtype=torch.int64), torch.as_tensor(cols[order], dtype=torch.int64)


def box_coverage(boxes: Tensor, valid: Tensor, h: int, w: int, sy: float, sx: float) -> Tensor:
    """(B, N, 4) xyxy pixels with (B, N) valid → (B, 1, h, w) coverage of each cell by the union of boxes."""
    b = boxes.shape[0]
    if boxes.shape[1] == 0:
        return boxes.new_zeros(b, 1, h, w)
    gx = torch.arange(w, device=boxes.device, dtype=torch.float32).view(1, 1, 1, w) * sx
    gy = torch.arange(h, device=boxes.device, dtype=torch.float32).view(1, 1, h, 1) * sy
    x1, y1, x2, y2 = (v[..., None, None] for v in boxes.float().unbind(-1))
    ox = (torch.minimum(x2, gx + sx) - torch.maximum(x1, gx)).clamp_min(0) / sx
    oy = (torch.minimum(y2, gy + sy) - torch.maximum(y1, gy)).clamp_min(0) / sy
    return (ox * oy * valid[..., None, None]).amax(1, keepdim=True).clamp(0, 1)


class QueryLocalizationCriterion(nn.Module):
    """DETR set losses with Hungarian matching, per decoder layer and for the query selection.

    Each prediction set (the last decoder layer; every earlier layer, suffix ``_0``, ``_1`` …;
    the two-stage token predictions, suffix ``_enc``) is matched one-to-one to the sample's boxes
    (:func:`hungarian_match`), then: ``loss_ce`` sigmoid focal loss over all queries × classes
    (matched queries → their class, the rest → background), ``loss_bbox`` L1 on normalised cxcywh
    and ``loss_giou`` 1 − GIoU of the matched pairs, each summed and divided by the number of
    boxes in the batch; ``loss_defect`` BCE of the defect heatmap against the mask's cell coverage
    (else the boxes' coverage). Samples without box labels (``has_boxes`` False and no boxes) are
    left out of every term; a box-labelled sample with no boxes (defect-free) trains all its
    queries towards background. A batch with no labelled sample gives a zero that still reaches
    every head parameter.

    Args:
        num_classes: C; checked against the head's logits when given.
        weight_dict: loss name → weight. Base names ``loss_ce``, ``loss_bbox``, ``loss_giou``,
            ``loss_defect`` weight every set; a suffixed name (``loss_ce_enc``, ``loss_bbox_0``)
            overrides one set.
        cost_class, cost_bbox, cost_giou: matching cost weights (Deformable DETR: 2, 5, 2).
        focal_alpha, focal_gamma: focal loss (and cost) parameters.
        aux_loss: supervise the earlier decoder layers and the query selection too.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        weight_dict: dict[str, float] | None = None,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict or {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_defect": 1.0})
        for name in self.weight_dict:
            base, _, suffix = name.rpartition("_")
            if name not in LOSSES and not (base in LOSSES and (suffix == "enc" or suffix.isdigit())):
                raise ValueError(f"unknown loss {name!r} in weight_dict; known: {list(LOSSES)} (optionally suffixed _enc or _<layer>)")
        self.costs = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.aux_loss = aux_loss

    def _weight(self, name: str) -> float:
        if name in self.weight_dict:
            return self.weight_dict[name]
        base = name.rpartition("_")[0]
        return self.weight_dict.get(base, 0.0)

    @staticmethod
    def _image_size(out: QueryLocalizationOutput, targets: dict) -> tuple[float, float]:
        ref = targets.get("image", targets.get("mask"))
        if ref is not None:
            return float(ref.shape[-2]), float(ref.shape[-1])
        if "image_size" in targets:
            return float(targets["image_size"][0]), float(targets["image_size"][1])
        raise ValueError("QueryLocalizationCriterion needs 'image', 'mask' or 'image_size' in the targets to normalise the boxes")

    def prepare_targets(self, out: QueryLocalizationOutput, targets: dict) -> dict:
        """Padded batch → per-sample normalised cxcywh boxes and labels, ``labelled`` (B,) and the defect target."""
        b, _, c = out.logits.shape
        device = out.logits.device
        H, W = self._image_size(out, targets)
        boxes = targets["boxes"].to(device=device, dtype=torch.float32).reshape(b, -1, 4)
        labels = targets["labels"].to(device).reshape(b, -1)
        valid = targets["box_mask"].to(device).reshape(b, -1).bool() & (labels >= 0) & (labels < c)
        valid &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        has_boxes = targets.get("has_boxes")
        labelled = torch.ones(b, dtype=torch.bool, device=device) if has_boxes is None else has_boxes.to(device).bool()
        labelled = labelled | valid.any(1)
        scale = boxes.new_tensor([W, H, W, H])
        norm = box_xyxy_to_cxcywh(boxes / scale)
        per_sample = [(labels[i][valid[i]], norm[i][valid[i]]) for i in range(b)]
        h, w = out.defect.shape[-2:]
        defect = box_coverage(boxes, valid, h, w, H / h, W / w)
        if "mask" in targets and targets.get("has_mask") is not None:
            has_mask = targets["has_mask"].to(device).bool()
            if has_mask.any():
                m = F.interpolate(targets["mask"].to(device=device, dtype=torch.float32).unsqueeze(1), size=(h, w), mode="area")
                defect = torch.where(has_mask.view(b, 1, 1, 1), m.clamp(0, 1), defect)
                labelled = labelled | has_mask
        return {"targets": per_sample, "labelled": labelled, "defect": defect}

    def _set_losses(self, logits: Tensor, boxes: Tensor, t: dict, num_boxes: float) -> dict[str, Tensor]:
        """loss_ce / loss_bbox / loss_giou of one prediction set (B, Q, C), (B, Q, 4)."""
        keep = t["labelled"]
        target_cls = torch.zeros_like(logits, dtype=torch.float32)
        src_boxes, tgt_boxes = [], []
        for i, (labels, tboxes) in enumerate(t["targets"]):
            if not bool(keep[i]) or labels.numel() == 0:
                continue
            qi, ti = hungarian_match(logits[i].detach(), boxes[i].detach(), labels, tboxes, **self.costs)
            qi, ti = qi.to(logits.device), ti.to(logits.device)
            target_cls[i, qi, labels[ti]] = 1.0
            src_boxes.append(boxes[i, qi])
            tgt_boxes.append(tboxes[ti])
        ce = sigmoid_focal_loss(logits[keep].float(), target_cls[keep], self.focal_alpha, self.focal_gamma, reduction="sum") / num_boxes
        if src_boxes:
            src, tgt = torch.cat(src_boxes).float(), torch.cat(tgt_boxes)
            l1 = (src - tgt).abs().sum() / num_boxes
            giou = (1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))).sum() / num_boxes
        else:  # labelled but defect-free samples only: zeros that keep the graph
            l1 = giou = boxes.sum() * 0.0
        return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": giou}

    def forward(self, outputs, targets: dict) -> dict[str, Tensor]:
        """``outputs``: a :class:`QueryLocalizationOutput` (or anything with ``.localization``).
        Returns every term with a non-zero weight and ``loss`` (their weighted sum)."""
        out: QueryLocalizationOutput = getattr(outputs, "localization", outputs)
        if self.num_classes is not None and out.logits.shape[-1] != self.num_classes:
            raise ValueError(f"criterion has {self.num_classes} classes, the head gives {out.logits.shape[-1]} class logits")
        sets = [("", out.logits, out.boxes)]
        if self.aux_loss:
            sets += [(f"_{i}", out.aux_logits[i], out.aux_boxes[i]) for i in range(out.aux_logits.shape[0])]
            if out.enc_logits.shape[1]:
                sets.append(("_enc", out.enc_logits, out.enc_boxes))
        names = [f"{base}{sfx}" for sfx, _, _ in sets for base in LOSSES if base != "loss_defect" or sfx == ""]
        names = [n for n in names if self._weight(n) != 0.0]
        t = self.prepare_targets(out, targets) if "boxes" in targets else None
        losses: dict[str, Tensor] = {}
        if t is not None and bool(t["labelled"].any()):
            num_boxes = float(max(1, sum(int(labels.numel()) for (labels, _), k in zip(t["targets"], t["labelled"]) if k)))
            for sfx, logits, boxes in sets:
                for k, v in self._set_losses(logits, boxes, t, num_boxes).items():
                    if f"{k}{sfx}" in names:
                        losses[f"{k}{sfx}"] = v
            if "loss_defect" in names:
                keep = t["labelled"]
                losses["loss_defect"] = F.binary_cross_entropy_with_logits(out.defect[keep].float(), t["defect"][keep])
        else:  # nothing labelled: a zero that still reaches every head parameter
            zero = sum(x.sum() for x in out) * 0.0
            losses = {n: zero for n in names}
        losses["loss"] = sum(self._weight(k) * v for k, v in losses.items())
        return losses


# --------------------------------------------------------------------------- decoding


class QueryBoxDecoder(nn.Module):
    """Top-K decoding of the query head with fixed shapes (exportable like :class:`BoxDecoder`):
    sigmoid class probabilities, top-K over all Q·C query-class pairs (Deformable DETR's
    postprocess; a query may give boxes of several classes, no NMS: the one-to-one matching
    trained duplicates away), boxes from normalised cxcywh to xyxy input-frame pixels.

    Args:
        stride: model-input pixels per defect-heatmap cell (only the output spec uses it).
        train_size: (H, W) the model sees. input_size: (H, W) of the deployable's frames (default train_size).
        top_k: K (at most Q·C). tta_views: views stacked on the batch; boxes from the first view only.

    Shapes:
        forward: :class:`QueryLocalizationOutput` → (boxes (N, K, 4) float32 xyxy input-frame pixels,
        box_scores (N, K) float32 descending, box_labels (N, K) int64, defect_heatmap (N, 1, h, w)
        float32 in [0, 1]) — the same outputs as :class:`~lineside.fusion.box_decoder.BoxDecoder`.
    """

    def __init__(self, stride: float, train_size: Sequence[int], input_size: Sequence[int] | None = None,
                 top_k: int = 100, tta_views: int = 1) -> None:
        super().__init__()
        self.stride = float(stride)
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.input_size = tuple(int(v) for v in (input_size or self.train_size))
        self.top_k, self.tta_views = int(top_k), tta_views

    def outputs(self) -> list[TensorSpec]:
        from lineside.export.deployable import TensorSpec

        k = self.top_k
        h, w = -(-self.train_size[0] // int(self.stride)), -(-self.train_size[1] // int(self.stride))
        return [
            TensorSpec("boxes", "float32", ("N", k, 4), "box", "top-K defect boxes x1, y1, x2, y2 in input-frame pixels"),
            TensorSpec("box_scores", "float32", ("N", k), "box_score", "box confidence (query class probability), descending"),
            TensorSpec("box_labels", "int64", ("N", k), "box_label", "defect class index of each box"),
            TensorSpec("defect_heatmap", "float32", ("N", 1, h, w), "float", "class-agnostic defect probability per heatmap cell"),
        ]

    def forward(self, loc: QueryLocalizationOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits, boxes, defect = loc.logits, loc.boxes, loc.defect
        if self.tta_views > 1:
            n = logits.shape[0] // self.tta_views
            logits, boxes, defect = logits[:n], boxes[:n], defect[:n]
        b, q, c = logits.shape
        if self.top_k > q * c:
            raise ValueError(f"top_k={self.top_k} exceeds the {q}x{c} query-class pairs; lower top_k")
        scores, index = logits.float().sigmoid().flatten(1).topk(self.top_k, dim=1)
        query = torch.div(index, c, rounding_mode="floor")
        labels = index - query * c
        picked = boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        th, tw = self.train_size
        x1, y1, x2, y2 = box_cxcywh_to_xyxy(picked).unbind(-1)
        sy, sx = self.input_size[0] / th, self.input_size[1] / tw
        out = torch.stack([(x1 * tw).clamp(0, tw) * sx, (y1 * th).clamp(0, th) * sy,
                           (x2 * tw).clamp(0, tw) * sx, (y2 * th).clamp(0, th) * sy], -1)
        return out, scores, labels.to(torch.int64), defect.float().sigmoid()
