"""InspectionImageDataset: records → sample dicts for the fusion model."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vision.io import read_image
from vision.records import ImageRecord

__all__ = ["InspectionImageDataset"]


class InspectionImageDataset(Dataset):
    """Images with optional grade labels and text.

    Each sample is a dict:
        ``image``: (C, H, W) uint8 tensor after ``transform``;
        ``grade``: int64 scalar, -1 when unlabelled;
        ``text``: str (may be empty);
        ``path``: str.

    A file that cannot be read raises :class:`vision.io.ImageReadError` naming it.

    Args:
        records: the images.
        transform: an albumentations pipeline ending in ``ToTensorV2`` (``image=`` HxWxC uint8).
        channels: 1 (grayscale) or 3 (RGB).
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Callable | None = None, channels: int = 1) -> None:
        self.records = list(records)
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = read_image(rec.path, self.channels)
        if self.transform is not None:
            tensor = self.transform(image=image)["image"]
        else:
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        return {"image": tensor, "grade": torch.tensor(rec.label, dtype=torch.long), "text": rec.text, "path": rec.path}
