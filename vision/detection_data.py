"""Box-labelled images for the localization head: albumentations pipelines that move boxes and
masks with the image, a torch ``Dataset`` over :class:`DetectionRecord` lists, and the collate
function that pads boxes.

Per sample (:class:`DetectionDataset`):

``image``   (C, H, W) ``uint8`` tensor (normalisation lives in the model)
``boxes``   (M, 4) ``float32`` xyxy pixel-edge boxes in the *transformed* image
``labels``  (M,) ``int64``
``mask``    (H, W) ``uint8`` 0/1, only when the record has a mask
``path``    ``str``

Per batch (:func:`detection_collate`), B samples, N = max(1, max M):

``image``     (B, C, H, W) ``uint8`` (pipelines end at a fixed size, so frames stack)
``boxes``     (B, N, 4) ``float32``, zero rows past each sample's M
``labels``    (B, N) ``int64``, -1 past each sample's M
``box_mask``  (B, N) ``bool``, True on real boxes
``mask``      (B, H, W) ``uint8``, zeros for samples without a mask
``has_mask``  (B,) ``bool``, which samples carry mask supervision
``path``      list of B ``str``
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from lineside.vision.box_records import DetectionRecord, load_detection_sample  # noqa: E402
from lineside.vision.transforms import FrameResize  # noqa: E402

__all__ = [
    "DetectionDataset",
    "build_detection_eval_transform",
    "build_detection_train_transform",
    "detection_collate",
    "detection_compose",
]


def detection_compose(ops: Sequence, min_visibility: float = 0.3, min_size: float = 1.0, seed: int | None = None) -> A.Compose:
    """``A.Compose(ops + [ToTensorV2()])`` with boxes in ``pascal_voc`` pixels (xyxy) and ``labels``
    carried beside them. A box keeping less than ``min_visibility`` of its area after cropping or
    shifting, or narrower than ``min_size`` pixels, is dropped with its label."""
    return A.Compose(
        [*ops, ToTensorV2()],
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, min_width=min_size, min_height=min_size, clip=True
        ),
        seed=seed,
    )


def build_detection_eval_transform(image_size: int | tuple[int, int]) -> A.Compose:
    """Resize to ``image_size`` (side, or ``(height, width)``); boxes and mask scale with it."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return detection_compose([FrameResize(h, w, mask_interpolation=0)], min_visibility=0.0)


def build_detection_train_transform(
    image_size: int | tuple[int, int],
    vertical_flip: bool = True,
    min_visibility: float = 0.3,
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline: resize, horizontal (and vertical) flips, a small affine (±7 % scale,
    ±4 % shift, ±3° rotation, zero border), brightness/contrast and gamma.

    Rotation is kept small so the rotated boxes' enclosing rectangles stay tight. Boxes that
    the shift pushes mostly out (less than ``min_visibility`` of their area left) are dropped;
    masks use nearest-neighbour interpolation so they stay 0/1.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    ops = [
        FrameResize(h, w, mask_interpolation=0),
        A.HorizontalFlip(p=0.5),
        *([A.VerticalFlip(p=0.5)] if vertical_flip else []),
        A.Affine(scale=(0.93, 1.07), translate_percent=(-0.04, 0.04), rotate=(-3, 3), border_mode=0, fill=0, fill_mask=0, mask_interpolation=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
    ]
    return detection_compose(ops, min_visibility=min_visibility, seed=seed)


class DetectionDataset(Dataset):
    """Records → the per-sample dict in this module's docstring.

    Args:
        records: from a reader in :mod:`lineside.vision.box_formats`.
        transform: a pipeline from :func:`detection_compose` (or the builders here), called as
            ``transform(image=, bboxes=, labels=[, mask=])``; ``None`` keeps the image's own size.
        channels: 1 (grayscale) or 3 (RGB).
    """

    def __init__(self, records: Sequence[DetectionRecord], transform: Callable | None = None, channels: int = 3) -> None:
        self.records = list(records)
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        sample = load_detection_sample(self.records[index], self.channels)
        out = {"path": sample["path"]}
        if self.transform is not None:
            kwargs = {"image": sample["image"], "bboxes": sample["boxes"], "labels": sample["labels"]}
            if "mask" in sample:
                kwargs["mask"] = sample["mask"]
            t = self.transform(**kwargs)
            image = t["image"]
            image = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            boxes, labels = np.asarray(t["bboxes"], dtype=np.float32).reshape(-1, 4), np.asarray(t["labels"], dtype=np.int64).reshape(-1)
            mask = t.get("mask") if "mask" in sample else None
        else:
            image = torch.from_numpy(sample["image"]).permute(2, 0, 1)
            boxes, labels, mask = sample["boxes"], sample["labels"], sample.get("mask")
        out["image"] = image.contiguous()
        out["boxes"] = torch.from_numpy(boxes.copy())
        out["labels"] = torch.from_numpy(labels.copy())
        if mask is not None:
            out["mask"] = (mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(mask))).to(torch.uint8)
        return out


def detection_collate(samples: Sequence[dict]) -> dict:
    """Stack images, pad boxes/labels to the batch's most boxes (at least 1) with ``box_mask``,
    and stack masks with ``has_mask`` (keys and shapes in this module's docstring)."""
    if not samples:
        raise ValueError("detection_collate got an empty batch")
    images = [s["image"] for s in samples]
    if len({tuple(i.shape) for i in images}) > 1:
        raise ValueError(f"images differ in shape {sorted({tuple(i.shape) for i in images})}; end the pipeline with a resize")
    b, n = len(samples), max(1, max(len(s["labels"]) for s in samples))
    boxes = torch.zeros(b, n, 4, dtype=torch.float32)
    labels = torch.full((b, n), -1, dtype=torch.int64)
    box_mask = torch.zeros(b, n, dtype=torch.bool)
    for i, s in enumerate(samples):
        m = len(s["labels"])
        boxes[i, :m] = s["boxes"]
        labels[i, :m] = s["labels"]
        box_mask[i, :m] = True
    _, h, w = images[0].shape
    masks = torch.zeros(b, h, w, dtype=torch.uint8)
    has_mask = torch.zeros(b, dtype=torch.bool)
    for i, s in enumerate(samples):
        if "mask" in s:
            masks[i] = s["mask"]
            has_mask[i] = True
    return {
        "image": torch.stack(images),
        "boxes": boxes,
        "labels": labels,
        "box_mask": box_mask,
        "mask": masks,
        "has_mask": has_mask,
        "path": [s["path"] for s in samples],
    }
