"""GradeMetrics: the grading metrics of ``lineside test`` as one torchmetrics ``Metric``.

The definitions are those ``lineside score`` reports on a labelled manifest
(:func:`lineside.fusion.ensemble.grade_metrics`), so both commands print the same figures on
the same decoded probabilities:

* ``acc``: share of labelled samples whose argmax grade is right;
* ``macro_f1``: mean F1 over *all* K grades (a grade neither present nor predicted counts 0);
* ``recall``: (K,) per-grade recall (0 for an absent grade);
* ``confusion``: (K, K) counts, rows = true grade, columns = predicted;
* ``auroc_defective``: AUROC of ``1 - p(grade 0)`` for defective (grade > 0) vs ok; NaN when one side is absent;
* ``nll``: mean negative log-likelihood of the true grade (probabilities clamped at 1e-8).

Samples with grade < 0 (unlabelled) are left out.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = ["GradeMetrics", "format_confusion"]


class GradeMetrics(Metric):
    """Accuracy, macro-F1, per-grade recall, confusion matrix, AUROC ok-vs-defective and NLL.

    Args:
        num_grades: K.

    Shapes:
        update: probs (N, K) grade probabilities, grade (N,) int64 (-1 = unlabelled).
        compute: → dict of scalar tensors ``acc``, ``macro_f1``, ``auroc_defective``, ``nll``, ``n``
        and ``recall`` (K,), ``confusion`` (K, K).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_grades: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_grades = int(num_grades)
        k = self.num_grades
        self.add_state("confusion", torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("defect_score", [], dist_reduce_fx="cat")
        self.add_state("defective", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, grade: Tensor) -> None:
        keep = grade >= 0
        probs, grade = probs[keep].float(), grade[keep].long()
        if grade.numel() == 0:
            return
        k = self.num_grades
        pred = probs.argmax(-1)
        self.confusion += torch.bincount(grade * k + pred, minlength=k * k).view(k, k)
        self.nll_sum += -probs.gather(1, grade[:, None]).clamp_min(1e-8).log().sum()
        self.defect_score.append(1.0 - probs[:, 0])
        self.defective.append((grade > 0).long())

    def compute(self) -> dict[str, Tensor]:
        cm = self.confusion.float()
        tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        n = support.sum()
        recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
        denom = support + predicted
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
        out = {
            "n": n,
            "acc": tp.sum() / n.clamp_min(1),
            "macro_f1": f1.mean(),
            "recall": recall,
            "confusion": self.confusion,
            "nll": self.nll_sum / n.clamp_min(1),
            "auroc_defective": torch.tensor(float("nan")),
        }
        if len(self.defective):  # a list per process; one tensor once synced across DDP processes
            target = dim_zero_cat(self.defective)
            if bool(target.any()) and not bool(target.all()):
                out["auroc_defective"] = binary_auroc(dim_zero_cat(self.defect_score), target)
        return out


def format_confusion(class_names: Sequence[str], cm: Sequence[Sequence[int]]) -> str:
    """A confusion matrix as aligned text (rows = true grade, columns = predicted)."""
    width = max(8, *(len(n) for n in class_names)) + 1
    lines = ["confusion matrix (rows = true grade, columns = predicted):", " " * width + "".join(f"{n:>{width}}" for n in class_names)]
    lines += [f"{n:>{width}}" + "".join(f"{v:>{width}}" for v in row) for n, row in zip(class_names, cm)]
    return "\n".join(lines)
