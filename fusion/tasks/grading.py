"""The grading task: severity grade of a defect (ok < mild < … < severe).

Head :class:`~lineside.fusion.grading_head.GradingHead`, criterion
:class:`~lineside.fusion.criterion.GradingCriterion` (class-weighted cross-entropy + ordinal term),
decoder :class:`GradingDecoder` (``grade_probs``, ``grade`` and, on images, ``grade_heatmap``),
metrics :class:`~lineside.fusion.grade_metrics.GradeMetrics` (those ``lineside score`` reports).
Labels: batch key ``grade`` (B,) int64, -1 = unlabelled.

Grading may repeat under names, one head and label space each (ELPV's four grades as ``grading/el``,
the castings' two as ``grading/xray``): a named task reads ``grade/<name>`` (a multi-task data module
puts a member's grades there, :class:`~lineside.fusion.multitask_datamodule.MemberLabels`), outputs
``grade_probs_<name>`` / ``grade_<name>``, logs ``val/grading/<name>/acc`` … and records its grade
names in the checkpoint as ``class_names_<name>``.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Sequence

from torch import Tensor, nn

from lineside.fusion.criterion import GradingCriterion
from lineside.fusion.grade_heatmap import GradeHeatmapDecoder, grade_heatmap_grid
from lineside.fusion.grade_metrics import GradeMetrics, format_confusion
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.outputs import TensorSpec
from lineside.fusion.postprocess import GradeDecoder
from lineside.fusion.tasks.base import Task, TaskDecoder, TaskSettings

__all__ = ["GradingDecoder", "GradingTask"]

log = logging.getLogger(__name__)


class GradingDecoder(TaskDecoder):
    """Grade logits (``V·N`` views) → ``grade_probs`` (N, K), ``grade`` (N,) and, with a ``grid``,
    ``grade_heatmap`` (N, 1, h, w) from the grading head's class-activation map."""

    def __init__(self, source: str, suffix: str, num_grades: int, tta_views: int = 1, grid: Sequence[int] | None = None) -> None:
        super().__init__(source, suffix)
        self.grades = GradeDecoder(num_grades, tta_views)
        self.heatmap = GradeHeatmapDecoder(grid, tta_views) if grid is not None else None
        self.model_options = {"grade_map": True} if self.heatmap is not None else {}

    def specs(self) -> list[TensorSpec]:
        return self.grades.outputs() + (self.heatmap.outputs() if self.heatmap is not None else [])

    def forward(self, out, context: dict) -> tuple[Tensor, ...]:
        probs, grade = self.grades(self.raw(out))
        if self.heatmap is None:
            return probs, grade
        return probs, grade, self.heatmap(out.grade_map, probs)


class GradingTask(Task):
    """Severity grades of whole images (or clouds): one logit per grade from the fused sequence."""

    kind = "grading"
    head_type = GradingHead
    slot = "grading_head"
    field = "grade_logits"
    modality = None
    label_key = "grade"
    data_hint = "grades"
    output_names = ("grade_probs", "grade", "grade_heatmap")
    progress = ("acc", "macro_f1")

    def explain(self, fused, encoded: dict) -> dict[str, Tensor]:
        if self.qualified or "image" not in encoded:
            return {}
        return {"grade_map": self.head.grade_map(fused, encoded["image"])}

    def label_names(self) -> list[str]:
        return [str(i) for i in range(self.head.num_grades)]

    def criterion(self) -> nn.Module:
        return GradingCriterion()

    def labelled(self, batch: dict) -> bool:
        return bool((self.targets(batch)["grade"] >= 0).any())

    def configure(self, datamodule, stage: str, criterion: nn.Module, metrics) -> list[str]:
        k = self.head.num_grades
        if datamodule.num_classes != k:
            where = self.slot if not self.qualified else f"heads.{self.name}"
            raise ValueError(
                f"data {datamodule.source} has {datamodule.num_classes} classes {datamodule.class_names} but the {self.name} head "
                f"has {k} outputs: set model.init_args.model.init_args.{where}.init_args.num_grades"
            )
        if stage == "fit":
            criterion.set_class_counts(datamodule.class_counts)
            log.info("class counts %s → weights %s", datamodule.class_counts, [round(w, 3) for w in criterion.class_weights.tolist()])
        return list(datamodule.class_names)

    def decoder(self, settings: TaskSettings) -> GradingDecoder:
        encoder = getattr(self.model, "image_encoder", None)
        grid = None
        if settings.grade_heatmap and not self.qualified and encoder is not None and settings.train_size is not None:
            grid = grade_heatmap_grid(encoder, settings.train_size)
        return GradingDecoder(self.source, self.suffix, self.head.num_grades, settings.tta_views, grid)

    def metrics(self, settings: TaskSettings) -> GradeMetrics:
        return GradeMetrics(self.head.num_grades)

    def update(self, metrics: GradeMetrics, decoded: dict[str, Tensor], batch: dict) -> None:
        metrics.update(decoded[self.output_name("grade_probs")], self.targets(batch)["grade"])

    def compute(self, metrics: GradeMetrics, stage: str, label_names: Sequence[str]) -> dict[str, Any]:
        if not metrics.update_called:
            return {}
        r = metrics.compute()
        if not int(r["n"]):
            return {}
        out = {"acc": r["acc"], "macro_f1": r["macro_f1"], "nll": r["nll"]}
        if stage == "test":
            out |= {f"recall_{name}": v for name, v in zip(label_names, r["recall"])}
            out["auroc_defective"] = r["auroc_defective"]
        return out

    def report(self, metrics: GradeMetrics, label_names: Sequence[str], log_dir: str | None) -> None:
        """Prints the confusion matrix and writes ``<log_dir>/test_confusion_matrix.csv``."""
        cm = metrics.compute()["confusion"].cpu().tolist()
        print(format_confusion(label_names, cm))
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            name = "test_confusion_matrix.csv" if not self.qualified else f"test_confusion_matrix_{self.suffix[1:]}.csv"
            with open(os.path.join(log_dir, name), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["true\\pred", *label_names])
                w.writerows([[n, *row] for n, row in zip(label_names, cm)])

    def checkpoint_record(self, datamodule, settings: TaskSettings) -> dict[str, Any]:
        """A named task's grade names (``class_names_xray``); the plain task's are ``class_names`` already."""
        names = getattr(datamodule, "class_names", None) if datamodule is not None else None
        if not self.qualified or names is None or getattr(datamodule, "task", "grading") != "grading":
            return {}
        return {"class_names" + self.suffix: list(names)}

    def predictions(self, decoded: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().predictions(decoded)
        probs = out.get(self.output_name("grade_probs"))
        if probs is not None and not self.qualified:  # the prediction writer's columns
            confidence, _ = probs.max(-1)
            out |= {"probs": probs, "confidence": confidence}
        return out
