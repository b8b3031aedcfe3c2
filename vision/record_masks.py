"""Binary-mask detection records as a segmentation data set (``lineside.vision.record_masks.RecordMaskDataset``).

Data sets such as magnetic tile give one binary mask per image and the defect class by folder
(``DetectionRecord.image_class``); the segmentation head wants one class index per pixel. This
data set turns a record's mask into that: pixels of the mask take the image's class index
(``class_names.index(image_class) + 1``), every other pixel is background (0); images of a class
that is not a defect class (magnetic tile ``Free``) are all background. With
``binary=True`` every mask pixel is 1 (one "defect" class).

Per sample: the keys of :mod:`lineside.vision.el_cracks` (``image`` (C, H, W) uint8, ``seg_mask``
(H, W) int64, ``has_seg`` True, ``grade`` -1, ``path``), so batches use
:func:`lineside.vision.el_cracks.segmentation_collate` and the pipelines of
:func:`lineside.vision.el_cracks.build_segmentation_train_transform` / ``..._eval_transform``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from lineside.vision.box_records import DetectionFormatError, DetectionRecord, read_binary_mask
from lineside.vision.el_cracks import segmentation_sample
from lineside.vision.io import ImageReadError, read_image

__all__ = ["RecordMaskDataset", "record_class_index"]


def record_class_index(record: DetectionRecord, class_names: Sequence[str], binary: bool = False) -> int:
    """The mask value of ``record``'s defect pixels: 1 + its class's index in ``class_names``
    (1 when ``binary``), 0 for an image class that is not among them (defect-free images)."""
    if record.image_class not in class_names:
        return 0
    return 1 if binary else list(class_names).index(record.image_class) + 1


class RecordMaskDataset(Dataset):
    """Mask-carrying :class:`DetectionRecord` s → image + class-index mask.

    Args:
        records: records with ``mask_path`` (a record without one is all background).
        class_names: the defect classes, in mask-value order (value k + 1 = ``class_names[k]``).
        transform: an albumentations pipeline called as ``transform(image=, mask=)`` (the
            segmentation builders of :mod:`lineside.vision.el_cracks`); ``None`` keeps the size.
        channels: 1 or 3.
        binary: one foreground class (every defect pixel is 1) instead of one per class.
    """

    def __init__(self, records: Sequence[DetectionRecord], class_names: Sequence[str], transform: Callable | None = None,
                 channels: int = 1, binary: bool = False) -> None:
        self.records = list(records)
        self.class_names = list(class_names)
        self.transform = transform
        self.channels = channels
        self.binary = binary

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        try:
            image = read_image(r.path, self.channels)
        except ImageReadError as exc:
            raise DetectionFormatError(str(exc)) from None
        if r.mask_path is not None:
            mask = read_binary_mask(r.mask_path)
            if mask.shape != image.shape[:2]:
                raise DetectionFormatError(f"{r.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {r.path} is "
                                           f"{image.shape[1]}x{image.shape[0]}")
        else:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        mask = mask * np.uint8(record_class_index(r, self.class_names, self.binary))
        return segmentation_sample(image, mask, self.transform, r.path)
