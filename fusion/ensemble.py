"""Model ensembles and decision biases: averaging cross-validation members, tuning grade offsets.

A grading model trained with class weights still leans towards the frequent grades; the
decision rule ``argmax(log p + b)`` with per-grade offsets ``b`` fitted on out-of-fold
predictions moves the operating point to what the line cares about (macro-F1 by default)
without touching the weights. :class:`InspectionEnsemble` carries both, so an exported or
scored model decides exactly as it was evaluated.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lineside.fusion.grade_metrics import format_confusion
from lineside.fusion.model import InspectionOutput

__all__ = ["InspectionEnsemble", "fit_grade_bias", "format_confusion", "grade_metrics"]

Objective = Literal["macro_f1", "acc", "mean"]


class InspectionEnsemble(nn.Module):
    """Averages the grade probabilities of ``members`` and adds per-grade decision offsets.

    Args:
        members: models returning ``grade_logits`` (e.g. :class:`fusion.model.InspectionModel`).
        grade_bias: (K,) offsets added to the log of the averaged probabilities; zeros if omitted.

    Shapes:
        forward: image (B, C, H, W) → :class:`InspectionOutput` whose ``grade_logits`` are
        ``log(mean_m softmax(logits_m)) + grade_bias`` (softmax of them = the decision probabilities).
    """

    def __init__(self, members: Sequence[nn.Module], grade_bias: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        k = {m.num_grades for m in self.members}
        if len(k) != 1:
            raise ValueError(f"ensemble members disagree on the number of grades: {sorted(k)}")
        bias = torch.zeros(k.pop()) if grade_bias is None else torch.as_tensor(grade_bias, dtype=torch.float32)
        if bias.shape != (self.num_grades,):
            raise ValueError(f"grade_bias has shape {tuple(bias.shape)}, expected ({self.num_grades},)")
        self.register_buffer("grade_bias", bias)

    @property
    def num_grades(self) -> int:
        return self.members[0].num_grades

    @property
    def in_chans(self) -> int:
        return self.members[0].in_chans

    @property
    def text_encoder(self):
        return getattr(self.members[0], "text_encoder", None)

    @property
    def tasks(self) -> list:
        """The grading task(s) of the first member: an ensemble averages grades only."""
        return [t for t in self.members[0].tasks if t.kind == "grading"]

    def forward(self, image: Tensor, **inputs) -> InspectionOutput:
        """``grade_map=True`` (members' ``grade_map`` averaged) passes through to the members."""
        outs = [m(image, **inputs) for m in self.members]
        logp = torch.stack([o.grade_logits.float().log_softmax(-1) for o in outs])
        mean = torch.logsumexp(logp, 0) - math.log(len(self.members))
        maps = [o.grade_map for o in outs if getattr(o, "grade_map", None) is not None]
        gmap = torch.stack(maps).float().mean(0) if len(maps) == len(outs) else None
        return InspectionOutput(mean + self.grade_bias, grade_map=gmap)


def grade_metrics(probs: np.ndarray, labels: np.ndarray, bias: Sequence[float] | None = None) -> dict:
    """Accuracy, macro-F1, per-grade recall, confusion matrix and AUROC ok-vs-defective.

    ``probs`` (N, K) are probabilities; ``bias`` (K,) offsets on their logs decide the grade.
    AUROC uses ``1 - p(grade 0)`` of the unbiased probabilities. Rows with label < 0 are ignored.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    keep = labels >= 0
    probs, labels = probs[keep], labels[keep]
    k = probs.shape[1]
    pred = _decide(np.log(np.clip(probs, 1e-12, None)), bias)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(k), where=(support + predicted) > 0)
    return {
        "n": int(len(labels)),
        "acc": float(tp.sum() / max(len(labels), 1)),
        "macro_f1": float(f1.mean()),
        "f1": f1.tolist(),
        "recall": recall.tolist(),
        "confusion": cm.tolist(),
        "auroc_defective": _auroc_defective(probs, labels),
    }


def _auroc_defective(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``1 - p(grade 0)`` for defective (grade > 0) vs ok; NaN when one side is absent."""
    from torchmetrics.functional.classification import binary_auroc

    positive = labels > 0
    if positive.all() or not positive.any():
        return float("nan")
    return float(binary_auroc(torch.from_numpy(1.0 - probs[:, 0]), torch.from_numpy(positive).long()))


def fit_grade_bias(
    probs: np.ndarray, labels: np.ndarray, objective: Objective = "macro_f1", span: float = 4.0, step: float = 0.05, rounds: int = 4
) -> np.ndarray:
    """Per-grade offsets ``b`` (``b[0] = 0``) maximising ``objective`` of ``argmax(log p + b)``.

    Coordinate ascent over a grid of ``[-span, span]``; ties keep the offset closest to zero, so
    with nothing to gain the rule stays plain argmax.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    keep = labels >= 0
    logp, labels = np.log(np.clip(probs[keep], 1e-12, None)), labels[keep]
    k = logp.shape[1]
    grid = np.round(np.arange(-span, span + step / 2, step), 6)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]  # try small offsets first: ties keep them
    bias = np.zeros(k)
    best = _score(logp, labels, bias, objective)
    for _ in range(rounds):
        improved = False
        for c in range(1, k):
            for v in grid:
                trial = bias.copy()
                trial[c] = v
                s = _score(logp, labels, trial, objective)
                if s > best + 1e-12:
                    best, bias, improved = s, trial, True
        if not improved:
            break
    return bias


def _decide(logp: np.ndarray, bias: Sequence[float] | None) -> np.ndarray:
    return (logp + (0 if bias is None else np.asarray(bias))).argmax(1)


def _score(logp: np.ndarray, labels: np.ndarray, bias: np.ndarray, objective: Objective) -> float:
    k = logp.shape[1]
    pred = _decide(logp, bias)
    acc = float((pred == labels).mean())
    if objective == "acc":
        return acc
    tp = np.bincount(labels[pred == labels], minlength=k)
    denom = np.bincount(labels, minlength=k) + np.bincount(pred, minlength=k)
    f1 = float(np.mean(np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)))
    if objective == "macro_f1":
        return f1
    if objective == "mean":
        return 0.5 * (f1 + acc)
    raise ValueError(f"unknown objective {objective!r}: use macro_f1, acc or mean")
