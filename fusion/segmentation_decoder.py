"""SegmentationDecoder: the segmentation head's logits → ``defect_masks`` and ``defect_heatmap`` (fixed shapes, exportable).

Outputs (``s`` = the head's stride in model-input pixels, (H, W) the training size; frames of
another input size are resized to it inside the graph, so a map cell covers ``s · input/train``
frame pixels):

``defect_masks``    (N, K, ⌈H/s⌉, ⌈W/s⌉) float32 per-class probabilities (softmax over background +
                    K classes; channel k = mask value k + 1)
``defect_heatmap``  (N, 1, ⌈H/s⌉, ⌈W/s⌉) float32 class-agnostic defect probability,
                    1 − p(background) − p(structure classes)

Boxes: connected regions are data-dependent, so they are found on the host from ``defect_masks``
(:func:`lineside.vision.segmentation_regions.regions_to_boxes`: threshold, 8-connected
components, one box per region with its class and mean probability), where the result records and
overlays are written; the graph keeps fixed shapes and TensorRT-parsable ops (softmax, mul, sum,
transpose/flip for test-time views).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lineside.fusion.outputs import TensorSpec
from lineside.fusion.segmentation_head import SegmentationOutput
from lineside.fusion.tasks.base import TaskDecoder

__all__ = ["SegmentationDecoder", "undo_dihedral_views"]

_VIEW_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)  # as fusion.postprocess.dihedral_views: index < 4 rotation k, else h-flip then rotation k - 4


def undo_dihedral_views(maps: Tensor, n_views: int) -> Tensor:
    """(V·N, C, h, w) maps of :func:`fusion.postprocess.dihedral_views` inputs → (N, C, h, w), each
    view mapped back to the original orientation and the views averaged."""
    if n_views == 1:
        return maps
    n = maps.shape[0] // n_views
    out = []
    for v, code in enumerate(_VIEW_ORDER[:n_views]):
        m = maps[v * n : (v + 1) * n]
        k = code % 4
        m = torch.rot90(m, -k, dims=(-2, -1)) if k else m
        out.append(m.flip(-1) if code >= 4 else m)
    return torch.stack(out).mean(0)


class SegmentationDecoder(TaskDecoder):
    """Logits → softmax probabilities of the K foreground classes and the defect heatmap.

    Args:
        source, suffix: as :class:`TaskDecoder`.
        stride: model-input pixels per output cell.
        train_size: (H, W) of the model input.
        class_names: the K foreground class names (output descriptions, metadata).
        defect_weight: (1, K + 1, 1, 1) 1 on defect channels, 0 on background and structure.
        tta_views: dihedral views stacked on the batch (averaged in probability).
    """

    def __init__(self, source: str, suffix: str, stride: int, train_size: Sequence[int], class_names: Sequence[str],
                 defect_weight: Tensor, tta_views: int = 1) -> None:
        super().__init__(source, suffix)
        self.stride = int(stride)
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.class_names = list(class_names)
        self.tta_views = tta_views
        self.register_buffer("defect_weight", defect_weight.detach().clone().float(), persistent=False)

    @property
    def grid(self) -> tuple[int, int]:
        s = self.stride
        return -(-self.train_size[0] // s), -(-self.train_size[1] // s)

    def specs(self) -> list[TensorSpec]:
        h, w = self.grid
        k = len(self.class_names)
        return [
            TensorSpec("defect_masks", "float32", ("N", k, h, w), "float",
                       f"per-class probability at stride {self.stride} of the {self.train_size[0]}x{self.train_size[1]} model input; "
                       f"channels {', '.join(self.class_names)}"),
            TensorSpec("defect_heatmap", "float32", ("N", 1, h, w), "float",
                       f"class-agnostic defect probability at stride {self.stride} (1 - background - structure classes)"),
        ]

    def decode(self, raw: SegmentationOutput, context: dict) -> tuple[Tensor, Tensor]:
        probs = raw.logits.float().softmax(1)
        probs = undo_dihedral_views(probs, self.tta_views)
        heat = (probs * self.defect_weight).sum(1, keepdim=True).clamp(0.0, 1.0)
        return probs[:, 1:].contiguous(), heat
