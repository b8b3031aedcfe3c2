"""FramePreprocessor: camera frames (uint8) → the pixels the model was trained on, inside the model.

Training decodes a file to ``uint8`` and resizes it with OpenCV's bilinear ``INTER_LINEAR``
(albumentations ``Resize(interpolation=1)``). Deployment must do exactly that, in one place
that travels with every exported graph: this module takes ``uint8`` (N, C, H, W) frames of
any fixed size, resizes them bilinearly (half-pixel centres, no antialiasing: OpenCV's
``INTER_LINEAR`` and ONNX ``Resize(mode=linear, coordinate_transformation_mode=half_pixel)``)
and hands float 0..255 to the model (whose :class:`vision.image_encoder.ImageEncoder`
normalises inside). It does not round to whole grey levels as OpenCV's ``uint8`` output does
(at most half a level apart): rounding would turn the last-bit differences between runtimes'
resize kernels into whole-level flips, and parity between backends matters more.

:func:`resize_frame` is the same resize on the host (NumPy/OpenCV), for frames whose size
differs from an artefact's fixed input size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FramePreprocessor", "resize_frame", "frames_to_batch"]


class FramePreprocessor(nn.Module):
    """uint8 frames → float pixels 0..255 at the training size.

    Args:
        size: (height, width) the model was trained on.

    Shapes:
        forward: (N, C, H, W) uint8 (or float 0..255) → (N, C, size[0], size[1]) float32; no
        resize when (H, W) already equals ``size``.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def forward(self, image: Tensor) -> Tensor:
        x = image.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        return x


def resize_frame(frame: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A (H, W, C) or (H, W) uint8 frame → (size[0], size[1], C) with OpenCV ``INTER_LINEAR``."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if frame.shape[:2] == (h, w):
        return frame if frame.ndim == 3 else frame[:, :, None]
    out = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


def frames_to_batch(frames: Sequence[np.ndarray], size: Sequence[int]) -> np.ndarray:
    """(H, W, C) uint8 frames of any sizes → one (N, C, size[0], size[1]) uint8 batch."""
    if not frames:
        return np.zeros((0, 1, int(size[0]), int(size[1])), dtype=np.uint8)
    return np.ascontiguousarray(np.stack([resize_frame(f, size) for f in frames]).transpose(0, 3, 1, 2))
