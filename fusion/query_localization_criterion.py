"""QueryLocalizationCriterion: DETR set losses for the query localization head (one function per
loss set, a ``weight_dict``), with Hungarian matching (:mod:`lineside.fusion.hungarian_matcher`).

Targets come from the padded detection batch and are read as every localization criterion reads
them (:mod:`lineside.fusion.box_targets`); boxes are normalised by the batch's image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from lineside.fusion.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from lineside.fusion.box_targets import defect_target, padded_box_targets, target_image_size
from lineside.fusion.hungarian_matcher import hungarian_match
from lineside.fusion.query_localization_output import QueryLocalizationOutput

__all__ = ["QueryLocalizationCriterion", "LOSSES"]

LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "loss_defect")


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

    def prepare_targets(self, out: QueryLocalizationOutput, targets: dict) -> dict:
        """Padded batch → per-sample normalised cxcywh boxes and labels, ``labelled`` (B,) and the defect target."""
        b, _, c = out.logits.shape
        size = target_image_size(targets)
        if size is None:
            raise ValueError("QueryLocalizationCriterion needs 'image', 'mask' or 'image_size' in the targets to normalise the boxes")
        H, W = size
        box_targets = padded_box_targets(targets, b, c, out.logits.device)
        boxes, labels, valid = box_targets.boxes, box_targets.labels, box_targets.valid
        norm = box_xyxy_to_cxcywh(boxes / boxes.new_tensor([W, H, W, H]))
        per_sample = [(labels[i][valid[i]], norm[i][valid[i]]) for i in range(b)]
        h, w = out.defect.shape[-2:]
        defect, labelled = defect_target(targets, box_targets, h, w, H / h, W / w)
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

