"""albumentations pipelines for inspection images.

Pipelines take and return ``uint8`` images: normalisation lives inside the model
(:class:`vision.image_encoder.ImageEncoder`), so a station feeds camera bytes straight in
and no preprocessing can drift between training and deployment. Their resize is
:class:`FrameResize`, lineside's one resize (:func:`vision.preprocess.resize_uint8`), the
same integer arithmetic ``lineside score``, the station and every exported graph run.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from lineside.vision.preprocess import resize_frame  # noqa: E402

__all__ = ["FrameResize", "GreyLevelNoise", "build_train_transform", "build_eval_transform", "camera_perturbations"]


class FrameResize(A.Resize):
    """``A.Resize`` whose image resize is :func:`vision.preprocess.resize_frame` (uint8 images).

    Bilinear with OpenCV ``INTER_LINEAR``'s positions and fixed-point rounding, in the integer
    arithmetic every lineside path shares; masks and boxes are handled as by ``A.Resize``
    (``mask_interpolation``).
    """

    def __init__(self, height: int, width: int, mask_interpolation: int = 0, p: float = 1.0) -> None:
        super().__init__(height, width, interpolation=1, mask_interpolation=mask_interpolation, p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        out = resize_frame(img, (self.height, self.width))
        return out if img.ndim == 3 else out[:, :, 0]


class GreyLevelNoise(A.ImageOnlyTransform):
    """Independent integer offsets uniform in [-levels, levels] on every pixel of a uint8 frame,
    clipped to 0..255 (``levels`` drawn from ``levels_range`` per image): the sub-grey-level
    sensor noise that makes two shots of one cell differ."""

    def __init__(self, levels_range: tuple[int, int] = (1, 2), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.levels_range = (int(levels_range[0]), int(levels_range[1]))

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        levels = int(self.random_generator.integers(self.levels_range[0], self.levels_range[1] + 1))
        noise = self.random_generator.integers(-levels, levels + 1, size=img.shape, dtype=np.int16)
        return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("levels_range",)


def camera_perturbations() -> list:
    """What a camera changes between two shots of one cell, on the raw frame (before the resize):
    ±1–2 grey-level noise (p 0.5) and a JPEG round trip at quality 85–100 (p 0.3)."""
    return [GreyLevelNoise((1, 2), p=0.5), A.ImageCompression(quality_range=(85, 100), p=0.3)]


def build_eval_transform(image_size: int) -> A.Compose:
    """Resize to ``image_size``² (:class:`FrameResize`) and convert to a ``uint8`` CHW tensor."""
    return A.Compose([FrameResize(image_size, image_size), ToTensorV2()])


def build_train_transform(image_size: int, strength: str = "inspection") -> A.Compose:
    """Training pipeline.

    Args:
        image_size: output side in pixels.
        strength: ``"inspection"`` (dihedral symmetries of a cell, small shifts/scales,
            exposure, sensor noise and defocus), ``"camera"`` (``"inspection"`` after
            :func:`camera_perturbations` of the raw frame: sub-grey-level noise and JPEG round
            trips, against grades that flip on them; ``lineside bench --stability`` measures
            it), ``"light"`` (flips + exposure only) or ``"none"`` (same as eval).
    """
    if strength == "none":
        return build_eval_transform(image_size)
    ops: list = [FrameResize(image_size, image_size)]
    if strength == "camera":
        ops = [*camera_perturbations(), *ops]
        strength = "inspection"
    if strength == "light":
        ops += [A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(0.15, 0.15, p=0.5)]
    elif strength == "inspection":
        ops += [
            A.D4(p=1.0),  # the 8 rotations/flips: a cell has no preferred orientation
            A.Affine(scale=(0.93, 1.07), translate_percent=(-0.03, 0.03), rotate=(-3, 3), border_mode=0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            A.OneOf([A.GaussNoise(std_range=(0.02, 0.06)), A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5)], p=0.3),
        ]
    else:
        raise ValueError(f"unknown augmentation strength {strength!r}; use 'inspection', 'camera', 'light' or 'none'")
    ops.append(ToTensorV2())
    return A.Compose(ops)
