"""albumentations pipelines for inspection images.

Pipelines take and return ``uint8`` images: normalisation lives inside the model
(:class:`vision.image_encoder.ImageEncoder`), so a station feeds camera bytes straight in
and no preprocessing can drift between training and deployment.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

__all__ = ["build_train_transform", "build_eval_transform"]


def build_eval_transform(image_size: int) -> A.Compose:
    """Resize to ``image_size``² and convert to a ``uint8`` CHW tensor."""
    return A.Compose([A.Resize(image_size, image_size, interpolation=1), ToTensorV2()])


def build_train_transform(image_size: int, strength: str = "inspection") -> A.Compose:
    """Training pipeline.

    Args:
        image_size: output side in pixels.
        strength: ``"inspection"`` (dihedral symmetries of a cell, small shifts/scales,
            exposure, sensor noise and defocus), ``"light"`` (flips + exposure only) or
            ``"none"`` (same as eval).
    """
    if strength == "none":
        return build_eval_transform(image_size)
    ops: list = [A.Resize(image_size, image_size, interpolation=1)]
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
        raise ValueError(f"unknown augmentation strength {strength!r}; use 'inspection', 'light' or 'none'")
    ops.append(ToTensorV2())
    return A.Compose(ops)
