"""GraspCriterion: losses for per-token grasp proposals (DETR style: one function per loss, a weight_dict).

Assignment (no gradient): a real token is *positive* when some ground-truth grasp centre lies within
``radius`` (normalised units) of its group centre. A positive token regresses the ground-truth
grasp among those within ``radius`` that best matches its current prediction (cost: L1 centre
distance + (1 - cos) approach + (1 - |cos|) closing), so several valid grasps at one spot (the
labeller spins approaches around each closing axis) do not pull a prediction toward their mean.

Masking: padded tokens never count; samples without any ground-truth grasp (``grasp_mask`` all
False, e.g. no label or an empty cloud) contribute nothing to any loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from lineside.fusion.grasp_head import GraspOutput

__all__ = ["GraspCriterion", "GraspTargets"]

LOSSES = ("loss_graspability", "loss_center", "loss_approach", "loss_closing", "loss_width")


class GraspTargets(dict):
    """Assignment result (dict): ``positive`` (B, G) bool, ``valid`` (B, G) bool (tokens that count),
    ``matched`` (B, G, 11) the ground-truth grasp each token regresses (garbage where not positive)."""


class GraspCriterion(nn.Module):
    """Graspability (sigmoid focal or BCE) + centre L1 + approach (1 - cos) + closing (1 - |cos|) + width L1.

    Args:
        weight_dict: loss name → weight; names: ``loss_graspability``, ``loss_center``,
            ``loss_approach``, ``loss_closing``, ``loss_width``.
        radius: a token is positive when a ground-truth grasp centre is within this distance of its
            group centre (normalised units; the dataset's clouds fit the unit ball).
        focal_alpha / focal_gamma: sigmoid focal loss parameters; ``focal_gamma=0`` and
            ``focal_alpha=-1`` give plain BCE.

    Shapes:
        forward: outputs :class:`GraspOutput` (B, G, …); targets ``grasps`` (B, M, 11) normalised,
        ``grasp_mask`` (B, M) bool → dict of the weighted-in losses and ``loss`` (their weighted sum).
    """

    def __init__(self, weight_dict: dict[str, float] | None = None, radius: float = 0.15, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.weight_dict = dict(weight_dict or {"loss_graspability": 2.0, "loss_center": 5.0, "loss_approach": 1.0, "loss_closing": 1.0, "loss_width": 5.0})
        unknown = set(self.weight_dict) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses in weight_dict: {sorted(unknown)}; known: {list(LOSSES)}")
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        self.radius = float(radius)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @torch.no_grad()
    def assign(self, outputs: GraspOutput, grasps: Tensor, grasp_mask: Tensor) -> GraspTargets:
        """Positive tokens and the ground-truth grasp each regresses (see the module docstring)."""
        gt = grasps.to(outputs.position.dtype)
        gmask = grasp_mask.to(torch.bool)
        d = torch.cdist(outputs.centres, gt[..., 0:3])  # (B, G, M)
        near = (d <= self.radius) & gmask.unsqueeze(1)
        cost = (outputs.position.unsqueeze(2) - gt[..., 0:3].unsqueeze(1)).abs().sum(-1)
        cost = cost + 1.0 - torch.einsum("bgk,bmk->bgm", outputs.approach, gt[..., 3:6])
        cost = cost + 1.0 - torch.einsum("bgk,bmk->bgm", outputs.closing, gt[..., 6:9]).abs()
        cost = torch.where(near, cost, torch.full_like(cost, float("inf")))
        idx = cost.argmin(-1)  # (B, G)
        matched = torch.gather(gt, 1, idx.unsqueeze(-1).expand(-1, -1, gt.shape[-1]))
        has_gt = gmask.any(1, keepdim=True)  # (B, 1)
        valid = ~outputs.padding_mask & has_gt
        positive = valid & near.any(-1)
        return GraspTargets(positive=positive, valid=valid, matched=matched)

    def loss_graspability(self, outputs: GraspOutput, t: GraspTargets) -> Tensor:
        logits = outputs.logits[t["valid"]]
        target = t["positive"][t["valid"]].to(logits.dtype)
        if self.focal_gamma == 0 and self.focal_alpha < 0:
            return F.binary_cross_entropy_with_logits(logits, target)
        # mean over positives (as focal-loss detectors normalise), at least 1
        return sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction="sum") / target.sum().clamp(min=1.0)

    def loss_center(self, outputs: GraspOutput, t: GraspTargets) -> Tensor:
        p = t["positive"]
        return (outputs.position[p] - t["matched"][p][:, 0:3]).abs().sum(-1).mean()

    def loss_approach(self, outputs: GraspOutput, t: GraspTargets) -> Tensor:
        p = t["positive"]
        return (1.0 - (outputs.approach[p] * t["matched"][p][:, 3:6]).sum(-1)).mean()

    def loss_closing(self, outputs: GraspOutput, t: GraspTargets) -> Tensor:
        p = t["positive"]
        return (1.0 - (outputs.closing[p] * t["matched"][p][:, 6:9]).sum(-1).abs()).mean()

    def loss_width(self, outputs: GraspOutput, t: GraspTargets) -> Tensor:
        p = t["positive"]
        return (outputs.width[p] - t["matched"][p][:, 9]).abs().mean()

    def forward(self, outputs: GraspOutput, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """``outputs``: a :class:`GraspOutput` (or anything with ``.grasp``, e.g. ``InspectionOutput``);
        targets: ``grasps`` (B, M, 11), ``grasp_mask`` (B, M). Returns each weighted-in loss and ``loss``."""
        outputs = getattr(outputs, "grasp", outputs)
        t = self.assign(outputs, targets["grasps"], targets["grasp_mask"])
        # zero that still reaches every output (and so every head parameter) when a term has no tokens
        zero = sum(x.sum() for x in (outputs.logits, outputs.position, outputs.approach, outputs.closing, outputs.width)) * 0.0
        losses: dict[str, Tensor] = {}
        for name in self.weight_dict:
            needed = t["valid"] if name == "loss_graspability" else t["positive"]
            losses[name] = getattr(self, name)(outputs, t) + zero if needed.any() else zero
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        return losses
