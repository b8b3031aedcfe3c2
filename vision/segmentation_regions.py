"""regions_to_boxes: per-class probability maps → boxes of connected regions (host side, NumPy + OpenCV).

Connected regions are data-dependent, so they are not in exported graphs: the segmentation task
exports ``defect_masks`` (N, K, h, w) at a stated stride and the result records / overlays call
this on the host.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ["regions_to_boxes"]


def regions_to_boxes(masks: np.ndarray, stride: float, class_names: Sequence[str], threshold: float = 0.5,
                     min_cells: int = 1, skip: Sequence[str] = ()) -> list[list[dict]]:
    """One list of regions per frame: each 8-connected region of ``masks[n, k] >= threshold``
    becomes ``{"box": [x0, y0, x1, y1], "label": class_names[k], "class_index": k, "score": mean
    probability of its cells, "area": cells}``, boxes in pixel-edge coordinates of the model input
    (cell ``(i, j)`` covers ``[j·s, (j+1)·s) × [i·s, (i+1)·s)``), highest score first.

    Args:
        masks: (N, K, h, w) or (K, h, w) probabilities (``defect_masks``).
        stride: model-input pixels per cell (multiply by input/train size for frame pixels).
        class_names: the K class names.
        threshold: a cell belongs to class k when its probability is at least this.
        min_cells: smaller regions are dropped.
        skip: class names to leave out (structure classes such as ``busbar``).
    """
    masks = np.asarray(masks, dtype=np.float32)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4 or masks.shape[1] != len(class_names):
        raise ValueError(f"masks must be (N, K={len(class_names)}, h, w), got {masks.shape}")
    out: list[list[dict]] = []
    for frame in masks:
        regions = []
        for k, name in enumerate(class_names):
            if name in skip:
                continue
            prob = frame[k]
            n, labels, stats, _ = cv2.connectedComponentsWithStats((prob >= threshold).astype(np.uint8), connectivity=8)
            for r in range(1, n):
                x, y, w, h, area = (int(v) for v in stats[r])
                if area < min_cells:
                    continue
                score = float(prob[labels == r].mean())
                regions.append({"box": [x * stride, y * stride, (x + w) * stride, (y + h) * stride], "label": str(name),
                                "class_index": k, "score": score, "area": area})
        regions.sort(key=lambda d: -d["score"])
        out.append(regions)
    return out
