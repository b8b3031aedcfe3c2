"""LocalizationCriterion: CenterNet losses for the localization head (DETR style: one function
per loss, a ``weight_dict``).

Targets come from the padded detection batch (:func:`lineside.vision.detection_data.detection_collate`):
``boxes`` (B, N, 4) xyxy model-input pixels, ``labels`` (B, N), ``box_mask`` (B, N), optionally
``mask`` (B, H, W) 0/1 with ``has_mask`` (B,), and ``has_boxes`` (B,) for mixed batches (samples
that carry no box labels at all; a box-labelled sample with no boxes is a defect-free image and
trains the heatmaps towards zero). They are read as every localization criterion reads them
(:mod:`lineside.fusion.box_targets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.box_targets import defect_target, padded_box_targets, target_image_size
from lineside.fusion.localization_head import LocalizationOutput

__all__ = ["LocalizationCriterion", "LocalizationTargets", "gaussian_radius"]

LOSSES = ("loss_heatmap", "loss_size", "loss_offset", "loss_defect", "loss_dice")


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's Gaussian radius (in the units of ``height``/``width``): the largest corner shift
    that keeps a box of that size at IoU ≥ ``min_overlap`` with the true one (the smallest of the
    three cases of CornerNet's ``gaussian_radius``)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


class LocalizationTargets(dict):
    """Targets on the head's grid (a dict, so tests and logging can read them by name).

    Keys: ``heatmap`` (B, C, h, w) Gaussian peaks (1 at centre cells), ``cell`` (B, N, 2) int64
    centre cell ``(x, y)``, ``size`` (B, N, 2) ``(log w, log h)``, ``offset`` (B, N, 2),
    ``box_valid`` (B, N) bool, ``defect`` (B, 1, h, w) in [0, 1], ``labelled`` (B,) bool (samples
    with box labels), ``stride`` (sy, sx) floats.
    """


class LocalizationCriterion(nn.Module):
    """CenterNet focal loss on Gaussian centre heatmaps, L1 on log size and offset at centres,
    BCE (and optional soft dice) on the defect heatmap.

    The defect target is the mask's coverage of each cell (area resize) where a mask exists, else
    the coverage of each cell by the union of the sample's boxes. Samples without box labels
    (``has_boxes`` False and no boxes) add nothing; a batch with none gives a zero that still
    reaches every head parameter.

    Args:
        num_classes: C; taken from the heatmap when not given.
        weight_dict: loss name → weight; names are ``loss_heatmap``, ``loss_size``,
            ``loss_offset``, ``loss_defect`` and (opt-in) ``loss_dice``.
        stride: model-input pixels per heatmap cell; inferred from the image (or mask) size and
            the heatmap size when not given.
        min_overlap: IoU the Gaussian radius keeps (CenterNet: 0.7).
        focal_alpha, focal_beta: exponents of the CenterNet focal loss (2, 4).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        weight_dict: dict[str, float] | None = None,
        stride: float | None = None,
        min_overlap: float = 0.7,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight_dict = dict(weight_dict or {"loss_heatmap": 1.0, "loss_size": 1.0, "loss_offset": 1.0, "loss_defect": 1.0})
        unknown = set(self.weight_dict) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses in weight_dict: {sorted(unknown)}; known: {list(LOSSES)}")
        self.stride = stride
        self.min_overlap = min_overlap
        self.focal_alpha = focal_alpha
        self.focal_beta = focal_beta

    # ------------------------------------------------------------------ targets

    def _stride(self, out: LocalizationOutput, targets: dict) -> tuple[float, float]:
        if self.stride is not None:
            return float(self.stride), float(self.stride)
        h, w = out.heatmap.shape[-2:]
        size = target_image_size(targets)
        if size is None:
            raise ValueError("LocalizationCriterion needs stride=, or 'image' / 'mask' / 'image_size' in the targets")
        return size[0] / h, size[1] / w

    @torch.no_grad()
    def build_targets(self, out: LocalizationOutput, targets: dict) -> LocalizationTargets:
        """Padded boxes (and masks) → targets on the (h, w) grid of ``out``."""
        b, c, h, w = out.heatmap.shape
        device = out.heatmap.device
        sy, sx = self._stride(out, targets)
        box_targets = padded_box_targets(targets, b, c, device)
        boxes, labels, valid = box_targets.boxes, box_targets.labels, box_targets.valid

        x1, y1, x2, y2 = boxes.unbind(-1)
        cx, cy = (x1 + x2) / 2 / sx, (y1 + y2) / 2 / sy  # centre in cells
        bw, bh = (x2 - x1).clamp_min(1e-3), (y2 - y1).clamp_min(1e-3)
        ix = cx.floor().clamp(0, w - 1)
        iy = cy.floor().clamp(0, h - 1)
        radius = gaussian_radius(bh / sy, bw / sx, self.min_overlap).floor().clamp_min(0)
        sigma = (2 * radius + 1) / 6
        gx = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, 1, w)
        gy = torch.arange(h, device=device, dtype=torch.float32).view(1, 1, h, 1)
        dx, dy = gx - ix[..., None, None], gy - iy[..., None, None]  # (B, N, h, w)
        r = radius[..., None, None]
        g = torch.exp(-(dx**2 + dy**2) / (2 * sigma[..., None, None] ** 2))
        g = g * ((dx.abs() <= r) & (dy.abs() <= r) & valid[..., None, None])
        onehot = F.one_hot(labels.clamp(0, c - 1), c).to(g.dtype) * valid[..., None]  # (B, N, C)
        heatmap = (g.unsqueeze(2) * onehot[..., None, None]).amax(1) if g.shape[1] else g.new_zeros(b, c, h, w)
        defect, labelled = defect_target(targets, box_targets, h, w, sy, sx)
        return LocalizationTargets(
            heatmap=heatmap,
            cell=torch.stack([ix, iy], -1).long(),
            size=torch.stack([bw.log(), bh.log()], -1),
            offset=torch.stack([cx - ix, cy - iy], -1),
            box_valid=valid & labelled[:, None],
            defect=defect,
            labelled=labelled,
            stride=(sy, sx),
        )

    # ------------------------------------------------------------------ losses

    def loss_heatmap(self, out: LocalizationOutput, t: LocalizationTargets) -> Tensor:
        """CenterNet focal loss over the labelled samples, normalised by the number of centres."""
        keep = t["labelled"]
        logits, target = out.heatmap[keep].float(), t["heatmap"][keep]
        pos = target.eq(1).to(logits.dtype)
        log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        p = logits.sigmoid()
        pos_loss = log_p * (1 - p) ** self.focal_alpha * pos
        neg_loss = log_1mp * p**self.focal_alpha * (1 - target) ** self.focal_beta * (1 - pos)
        return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1.0)

    def _at_centres(self, x: Tensor, t: LocalizationTargets) -> Tensor:
        """(B, 2, h, w) map → (B, N, 2) values at each box's centre cell."""
        b, _, _, w = x.shape
        flat = t["cell"][..., 1] * w + t["cell"][..., 0]  # (B, N)
        return x.float().flatten(2).gather(2, flat.unsqueeze(1).expand(-1, x.shape[1], -1)).transpose(1, 2)

    def _l1_at_centres(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        v = valid.unsqueeze(-1).to(pred.dtype)
        return ((pred - target).abs() * v).sum() / (2 * v.sum()).clamp_min(1.0)

    def loss_size(self, out: LocalizationOutput, t: LocalizationTargets) -> Tensor:
        """L1 on ``(log w, log h)`` at the centre cells."""
        return self._l1_at_centres(self._at_centres(out.size, t), t["size"], t["box_valid"])

    def loss_offset(self, out: LocalizationOutput, t: LocalizationTargets) -> Tensor:
        """L1 on the sub-cell centre offset at the centre cells."""
        return self._l1_at_centres(self._at_centres(out.offset, t), t["offset"], t["box_valid"])

    def loss_defect(self, out: LocalizationOutput, t: LocalizationTargets) -> Tensor:
        """BCE of the defect heatmap vs mask (or box) coverage per cell."""
        keep = t["labelled"]
        return F.binary_cross_entropy_with_logits(out.defect[keep].float(), t["defect"][keep])

    def loss_dice(self, out: LocalizationOutput, t: LocalizationTargets) -> Tensor:
        """Soft dice of the defect heatmap, per sample (empty target and empty prediction = 0)."""
        keep = t["labelled"]
        p, y = out.defect[keep].float().sigmoid().flatten(1), t["defect"][keep].flatten(1)
        dice = (2 * (p * y).sum(1) + 1.0) / (p.sum(1) + y.sum(1) + 1.0)
        return (1 - dice).mean()

    def forward(self, outputs, targets: dict) -> dict[str, Tensor]:
        """``outputs``: a :class:`LocalizationOutput` (or anything with ``.localization``, e.g.
        ``InspectionOutput``). Returns each weighted-in loss and ``loss`` (their weighted sum)."""
        out: LocalizationOutput = getattr(outputs, "localization", outputs)
        if self.num_classes is not None and out.heatmap.shape[1] != self.num_classes:
            raise ValueError(f"criterion has {self.num_classes} classes, the head gives {out.heatmap.shape[1]} heatmaps")
        losses: dict[str, Tensor] = {}
        t = self.build_targets(out, targets) if "boxes" in targets else None
        if t is not None and bool(t["labelled"].any()):
            for name in self.weight_dict:
                losses[name] = getattr(self, name)(out, t)
        else:  # nothing labelled: a zero that still reaches every head parameter
            zero = sum(x.sum() for x in out) * 0.0
            for name in self.weight_dict:
                losses[name] = zero
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        return losses
