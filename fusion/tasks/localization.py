"""The localization task: where the defects are (boxes with class and score, and a defect heatmap).

Two heads do it, each a task type of its own with the same outputs, metrics and labels:

* :class:`CenterNetLocalizationTask`: :class:`~lineside.fusion.localization_head.LocalizationHead`,
  :class:`~lineside.fusion.localization_criterion.LocalizationCriterion` on the head's grid,
  :class:`~lineside.fusion.box_decoder.BoxDecoder` (peaks of the centre heatmaps);
* :class:`QueryLocalizationTask`: :class:`~lineside.fusion.query_localization_head.QueryLocalizationHead`,
  :class:`~lineside.fusion.query_localization_criterion.QueryLocalizationCriterion` (Hungarian
  matching), :class:`~lineside.fusion.query_box_decoder.QueryBoxDecoder` (top-K query-class pairs).

Outputs ``boxes`` (N, K, 4), ``box_scores``, ``box_labels``, ``defect_heatmap`` (N, 1, h, w); metrics box
mAP (``map_50``, ``map``, per class) and, where masks exist, pixel AUROC and PRO of the heatmap.
Labels: the padded detection batch (``boxes``, ``labels``, ``box_mask``, ``has_boxes``, ``mask``, ``has_mask``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor, nn

from lineside.fusion.box_decoder import BoxDecoder
from lineside.fusion.localization_criterion import LocalizationCriterion
from lineside.fusion.localization_head import LocalizationHead
from lineside.fusion.outputs import TensorSpec
from lineside.fusion.query_box_decoder import QueryBoxDecoder
from lineside.fusion.query_localization_criterion import QueryLocalizationCriterion
from lineside.fusion.query_localization_head import QueryLocalizationHead
from lineside.fusion.tasks.base import Task, TaskDecoder, TaskSettings

__all__ = ["CenterNetLocalizationTask", "DetectionMetrics", "LocalizationDecoder", "LocalizationTask", "QueryLocalizationTask"]


class LocalizationDecoder(TaskDecoder):
    """The head's raw output → ``boxes``, ``box_scores``, ``box_labels``, ``defect_heatmap`` (``boxes`` wraps
    the head's own box decoder)."""

    def __init__(self, source: str, suffix: str, boxes: nn.Module) -> None:
        super().__init__(source, suffix)
        self.boxes = boxes

    def specs(self) -> list[TensorSpec]:
        return self.boxes.outputs()

    def decode(self, raw, context: dict) -> tuple[Tensor, ...]:
        return self.boxes(raw)


class DetectionMetrics(nn.Module):
    """Box mAP of decoded detections and pixel AUROC / PRO of the defect heatmap (torchmetrics underneath).

    Args:
        max_detections: boxes per image the mAP counts (the decoder's top-K).
    """

    def __init__(self, max_detections: int = 100) -> None:
        super().__init__()
        from lineside.fusion.detection_metrics import BoxMeanAP, PixelAUROC  # COCO backend: only where metrics are kept

        # + AP at IoU 0.33 (``map_33``): the DeepPCB benchmark's own criterion, beside COCO's 0.5 and 0.5:0.95
        self.box_map = BoxMeanAP([], max_detections=max_detections, extra_iou_thresholds=(0.33,))
        self.pixel_auroc = PixelAUROC()
        self.images = 0

    def update(self, decoded: Sequence[Tensor], targets: dict) -> None:
        boxes, scores, labels, heat = decoded
        keep = targets.get("has_boxes")
        self.box_map.update(boxes, scores, labels, targets["boxes"], targets["labels"], targets["box_mask"], keep)
        self.images += len(boxes) if keep is None else int(keep.sum())
        if "mask" in targets and "has_mask" in targets:
            self.pixel_auroc.update(heat, targets["mask"], targets["has_mask"])

    def compute(self, class_names: Sequence[str]) -> dict[str, Any]:
        if not self.images:
            return {}
        self.box_map.class_names = list(class_names)
        out: dict[str, Any] = dict(self.box_map.compute())
        auroc = self.pixel_auroc.compute()
        if not math.isnan(auroc):  # masks with both classes were seen
            out["pixel_auroc"] = auroc
            out["pro"] = self.pixel_auroc.compute_pro()  # per-region overlap up to FPR 0.3
        return out

    def reset(self) -> None:
        self.box_map.reset()
        self.pixel_auroc.reset()
        self.images = 0


class LocalizationTask(Task):
    """Defect boxes and a defect heatmap on the fused image tokens of one feature level."""

    kind = "localization"
    slot = "localization_head"
    field = "localization"
    modality = "image"
    label_key = "boxes"
    target_keys = ("labels", "box_mask", "has_boxes", "mask", "has_mask")
    data_hint = "defect boxes"
    output_names = ("boxes", "box_scores", "box_labels", "defect_heatmap")
    progress = ("map_50",)

    @property
    def stride(self) -> float:
        """Model-input pixels per cell of the head's grid."""
        if hasattr(self.head, "grid_stride"):  # CenterNet head: its level's, or the finest encoder map's (multi-scale)
            return self.head.grid_stride(self.model.image_encoder)
        return float(self.model.image_encoder.strides[self.head.level_index])

    def label_names(self) -> list[str]:
        return [str(i) for i in range(self.head.num_classes)]

    def box_decoder(self, settings: TaskSettings) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def decoder(self, settings: TaskSettings) -> LocalizationDecoder:
        return LocalizationDecoder(self.source, self.suffix, self.box_decoder(settings))

    def labelled(self, batch: dict) -> bool:
        has = self.targets(batch).get("has_boxes")
        return has is None or bool(has.any())

    def configure(self, datamodule, stage: str, criterion: nn.Module, metrics) -> list[str]:
        c = self.head.num_classes
        if datamodule.num_classes != c:
            raise ValueError(
                f"data {datamodule.source} has {datamodule.num_classes} defect classes {datamodule.class_names} but the "
                f"localization head has {c}: set model.init_args.model.init_args.{self.slot}.init_args.num_classes"
            )
        return list(datamodule.class_names)

    def metrics(self, settings: TaskSettings) -> DetectionMetrics:
        return DetectionMetrics(max_detections=settings.top_k)

    def update(self, metrics: DetectionMetrics, decoded: dict[str, Tensor], batch: dict) -> None:
        metrics.update([decoded[self.output_name(n)] for n in self.output_names], self.targets(batch))

    def compute(self, metrics: DetectionMetrics, stage: str, label_names: Sequence[str]) -> dict[str, Any]:
        return metrics.compute(label_names)


class CenterNetLocalizationTask(LocalizationTask):
    """Localization with the CenterNet head (per-class centre heatmaps, sizes, offsets)."""

    head_type = LocalizationHead

    def criterion(self) -> nn.Module:
        return LocalizationCriterion(self.head.num_classes, stride=self.stride)

    def box_decoder(self, settings: TaskSettings) -> BoxDecoder:
        h, w = settings.train_size
        s = int(self.stride)
        cells = self.head.num_classes * -(-h // s) * -(-w // s)
        return BoxDecoder(self.stride, settings.train_size, settings.input_size, min(settings.top_k, cells), tta_views=settings.tta_views)


class QueryLocalizationTask(LocalizationTask):
    """Localization with the query (DETR-style) head (matched queries, no NMS)."""

    head_type = QueryLocalizationHead

    def criterion(self) -> nn.Module:
        return QueryLocalizationCriterion(self.head.num_classes)

    def box_decoder(self, settings: TaskSettings) -> QueryBoxDecoder:
        k = min(settings.top_k, self.head.num_queries * self.head.num_classes)
        return QueryBoxDecoder(self.stride, settings.train_size, settings.input_size, k, settings.tta_views)
