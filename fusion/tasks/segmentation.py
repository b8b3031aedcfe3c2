"""The segmentation task: dense per-class defect masks for thin structures (cracks, crossings, dark areas).

Head :class:`~lineside.fusion.segmentation_head.SegmentationHead` (FPN top-down decoder over the
image encoder's backbone maps to stride 4 or 2), criterion
:class:`~lineside.fusion.segmentation_criterion.SegmentationCriterion` (``loss_seg_ce``,
``loss_seg_dice``), decoder :class:`~lineside.fusion.segmentation_decoder.SegmentationDecoder`
(outputs ``defect_masks`` (N, K, h, w) and ``defect_heatmap`` (N, 1, h, w) at the head's stride;
boxes of connected regions on the host: :func:`lineside.vision.segmentation_regions.regions_to_boxes`),
metrics :class:`~lineside.fusion.segmentation_metrics.SegmentationMetrics` (``iou/<class>``, ``miou``,
``crack_f1_2px``, ``pixel_auroc``, ``pro``).

Labels: ``seg_mask`` (B, H, W) int64 class index (0 background, k = class k) and ``has_seg`` (B,)
bool; samples with ``has_seg`` False add no loss and no metric. A model with both a localization
head and this one names one of them (``segmentation/el``): both output a ``defect_heatmap``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from lineside.fusion.segmentation_criterion import SegmentationCriterion
from lineside.fusion.segmentation_decoder import SegmentationDecoder
from lineside.fusion.segmentation_head import SegmentationHead
from lineside.fusion.segmentation_metrics import SegmentationMetrics
from lineside.fusion.tasks.base import Task, TaskSettings

__all__ = ["SegmentationTask"]


class SegmentationTask(Task):
    """Per-class defect masks and a class-agnostic defect heatmap from the image encoder's maps."""

    kind = "segmentation"
    head_type = SegmentationHead
    modality = "image"
    label_key = "seg_mask"
    target_keys = ("has_seg",)
    data_hint = "segmentation masks"
    output_names = ("defect_masks", "defect_heatmap")
    progress = ("miou",)

    def __init__(self, model: nn.Module, head: nn.Module, name: str | None = None) -> None:
        super().__init__(model, head, name)
        encoder = getattr(model, "image_encoder", None)
        channels = list(getattr(encoder, "map_channels", []) or [])
        if encoder is not None and channels != list(head.in_channels):
            raise ValueError(
                f"the {self.name} head reads backbone maps with channels {list(head.in_channels)} but the image encoder "
                f"gives {channels} (dense_levels, strides {list(getattr(encoder, 'map_strides', []))}): set the image "
                f"encoder's dense_levels and the head's in_channels to match"
            )

    @property
    def stride(self) -> int:
        """Model-input pixels per cell of the head's output (the finest backbone map's stride)."""
        return int(self.model.image_encoder.map_strides[0])

    def label_names(self) -> list[str]:
        return list(self.head.class_names)

    def criterion(self) -> nn.Module:
        return SegmentationCriterion(self.head.num_classes)

    def configure(self, datamodule, stage: str, criterion: nn.Module, metrics) -> list[str]:
        k = self.head.num_classes
        if datamodule.num_classes != k:
            raise ValueError(f"data {datamodule.source} has {datamodule.num_classes} mask classes {datamodule.class_names} but "
                             f"the {self.name} head has {k}: set its num_classes and class_names")
        return list(datamodule.class_names)

    def decoder(self, settings: TaskSettings) -> SegmentationDecoder:
        return SegmentationDecoder(self.source, self.suffix, self.stride, settings.train_size, self.head.class_names,
                                   self.head.defect_weight, settings.tta_views)

    def metrics(self, settings: TaskSettings) -> SegmentationMetrics:
        return SegmentationMetrics(self.head.class_names, self.head.defect_classes, self.head.thin_class_indices)

    def update(self, metrics: SegmentationMetrics, decoded: dict[str, Tensor], batch: dict) -> None:
        t = self.targets(batch)
        metrics.update(decoded[self.output_name("defect_masks")], decoded[self.output_name("defect_heatmap")], t["seg_mask"],
                       t.get("has_seg"))

    def compute(self, metrics: SegmentationMetrics, stage: str, label_names: Sequence[str]) -> dict[str, Any]:
        return metrics.compute()
