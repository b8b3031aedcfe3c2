"""GradingCriterion: losses for severity grades (DETR style: one function per loss, a weight_dict)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GradingCriterion"]


class GradingCriterion(nn.Module):
    """Class-weighted cross-entropy plus an ordinal (squared earth mover's) term.

    Grades are ordered (ok < mild < moderate < severe) and imbalanced (ELPV: 57% ok, 4%
    moderate). Cross-entropy is weighted by inverse class frequency (``class_weighting``) and
    the ordinal term ``sum_k (CDF_pred(k) - CDF_true(k))^2`` penalises a severe cell called ok
    more than one called moderate. Unlabelled samples (grade -1) add nothing.

    Args:
        num_grades: K; taken from the training counts or the logits when not given.
        weight_dict: loss name → weight; names are ``loss_grade`` and ``loss_ordinal``.
        class_weighting: ``"none"``, ``"inverse"`` or ``"inverse_sqrt"`` (of the training counts
            given to :meth:`set_class_counts`).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        num_grades: int | None = None,
        weight_dict: dict[str, float] | None = None,
        class_weighting: str = "inverse_sqrt",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if class_weighting not in ("none", "inverse", "inverse_sqrt"):
            raise ValueError(f"class_weighting must be none, inverse or inverse_sqrt; got {class_weighting!r}")
        self.num_grades = num_grades
        self.weight_dict = dict(weight_dict or {"loss_grade": 1.0, "loss_ordinal": 1.0})
        unknown = set(self.weight_dict) - {"loss_grade", "loss_ordinal"}
        if unknown:
            raise ValueError(f"unknown losses in weight_dict: {sorted(unknown)}")
        self.class_weighting = class_weighting
        self.label_smoothing = label_smoothing
        # recomputed from the training data at every fit start, so not part of checkpoints
        self.register_buffer("class_weights", torch.ones(num_grades or 0), persistent=False)

    def set_class_counts(self, counts: Sequence[int]) -> None:
        """Set class weights from training-set counts (mean weight over samples = 1)."""
        c = torch.as_tensor(list(counts), dtype=torch.float).clamp_min(1.0)
        if self.num_grades is not None and c.numel() != self.num_grades:
            raise ValueError(f"got {c.numel()} class counts for {self.num_grades} grades")
        self.num_grades = c.numel()
        if self.class_weighting == "none":
            w = torch.ones_like(c)
        else:
            w = (1.0 / c) if self.class_weighting == "inverse" else c.rsqrt()
        w = w * c.sum() / (w * c).sum()
        self.class_weights = w.to(self.class_weights.device)

    def loss_grade(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def loss_ordinal(self, logits: Tensor, target: Tensor) -> Tensor:
        cdf_pred = logits.softmax(-1).cumsum(-1)
        cdf_true = F.one_hot(target, self.num_grades).to(logits.dtype).cumsum(-1)
        per_sample = ((cdf_pred - cdf_true) ** 2).sum(-1)
        w = self.class_weights[target]
        return (per_sample * w).sum() / w.sum()

    def forward(self, outputs, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """``outputs``: grade logits (B, K) (or anything with ``.grade_logits``, e.g. ``InspectionOutput``);
        ``targets["grade"]`` (B,). Returns each weighted-in loss and ``loss`` (their weighted sum)."""
        logits, grade = getattr(outputs, "grade_logits", outputs), targets["grade"]
        if self.class_weights.numel() != logits.shape[-1]:
            if self.num_grades is not None and self.num_grades != logits.shape[-1]:
                raise ValueError(f"criterion has {self.num_grades} grades, model gives {logits.shape[-1]} logits")
            self.num_grades = logits.shape[-1]
            self.class_weights = torch.ones(self.num_grades, device=logits.device)
        valid = grade >= 0
        losses: dict[str, Tensor] = {}
        if valid.any():
            for name in self.weight_dict:
                losses[name] = getattr(self, name)(logits[valid], grade[valid])
        else:  # no labels in this batch: zero that still reaches every parameter of the graph
            for name in self.weight_dict:
                losses[name] = logits.sum() * 0.0
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        return losses
