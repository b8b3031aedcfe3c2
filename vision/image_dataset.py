"""InspectionImageDataset: records → sample dicts for the fusion model; ScoringImageDataset: paths → images or errors."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lineside.vision.io import read_image
from lineside.vision.records import ImageRecord

__all__ = ["InspectionImageDataset", "ScoringImageDataset"]


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


class ScoringImageDataset(Dataset):
    """Decodes one input to uint8 at the model's frame size for batch scoring; a failure becomes an
    error string, never an exception.

    Each sample is ``{"image": (C, H, W) uint8, "path": str, "error": str, "size": (H0, W0)}``
    (``size``: the file's own size, to map boxes back to its pixels; a zero image, ``size`` (0, 0)
    and a message starting with the path when the file cannot be used), so one bad file never stops a batch.
    The resize is :func:`vision.preprocess.resize_frame`, the one every path shares (training
    transforms, the station, the resize inside exported graphs; bit-exact to OpenCV
    ``INTER_LINEAR``); with ``size`` equal to the training size the model's in-graph resize is
    then a no-op, and with a larger artefact input size the graph's resize gives the same bytes.

    Args:
        paths: image files.
        size: frame side or (H, W).
        channels: 1 (grayscale) or 3 (RGB).
    """

    def __init__(self, paths: Sequence[str], size: int | Sequence[int], channels: int) -> None:
        self.paths = list(paths)
        self.channels = channels
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from lineside.vision.preprocess import resize_frame

        path = self.paths[i]
        try:
            raw = read_image(path, self.channels)
            size = (int(raw.shape[0]), int(raw.shape[1]))
            frame = resize_frame(raw, self.size)
            image = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))
            error = ""
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            image = torch.zeros(self.channels, *self.size, dtype=torch.uint8)
            size = (0, 0)
            error = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
        return {"image": image, "path": path, "error": error, "size": size}
