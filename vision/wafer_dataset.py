"""WaferMapDataset: wafer maps (die grids of 0/1/2) → uint8 images for the image encoder.

A map becomes an image by a fixed lookup, 0 (off the wafer) → 0, 1 (pass) → 127, 2 (fail) → 255
(one channel), or one plane per die state (three channels, 0/255 each), and is then resized to the
model's square input with lineside's one resize (:func:`vision.preprocess.resize_frame`), so maps of
every die grid (WM-811K has 632 shapes) share one input size. Scoring a map elsewhere uses
:func:`wafer_map_image`, the same two steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lineside.vision.preprocess import resize_frame
from lineside.vision.wafer_io import WaferMapRecord
from torch.utils.data import Dataset

__all__ = ["WAFER_LEVELS", "WaferMapDataset", "wafer_map_image"]

#: grey level of each die state: off the wafer, pass, fail.
WAFER_LEVELS = np.array([0, 127, 255], dtype=np.uint8)


def wafer_map_image(wafer_map: np.ndarray, size: int | Sequence[int], channels: int = 1) -> np.ndarray:
    """(H, W) map of 0/1/2 → (size, size, channels) uint8.

    ``channels=1``: grey levels :data:`WAFER_LEVELS`; ``channels=3``: planes (off, pass, fail), 255 where
    the die is in that state. Resized by :func:`vision.preprocess.resize_frame` (bilinear, fixed point).
    """
    m = np.asarray(wafer_map)
    if m.ndim != 2 or m.dtype.kind not in "ui" or m.size == 0 or m.max() > 2:
        raise ValueError(f"a wafer map is a 2-D integer array of 0/1/2, got shape {m.shape} dtype {m.dtype}")
    if channels == 1:
        img = WAFER_LEVELS[m][:, :, None]
    elif channels == 3:
        img = (np.eye(3, dtype=np.uint8)[m] * 255).astype(np.uint8)
    else:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return resize_frame(np.ascontiguousarray(img), (size, size) if isinstance(size, int) else size)


class WaferMapDataset(Dataset):
    """Wafer maps with optional class labels.

    Each sample is a dict:
        ``image``: (C, S, S) uint8 (:func:`wafer_map_image`);
        ``grade``: int64 scalar, the pattern class, -1 when unlabelled;
        ``text``: ``""``;
        ``path``: the record's source (file and row, or the generator and index).

    Args:
        records: the maps.
        image_size: side S of the model input.
        channels: 1 (grey levels) or 3 (one plane per die state).
        augment: apply one of the 8 rotations / flips of the die grid, drawn from torch's
            generator (a wafer pattern has no preferred orientation; the notch is a few dies).
    """

    def __init__(self, records: Sequence[WaferMapRecord], image_size: int = 64, channels: int = 1, augment: bool = False) -> None:
        self.records = list(records)
        self.image_size, self.channels, self.augment = int(image_size), int(channels), bool(augment)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        m = rec.wafer_map
        if self.augment:
            k = int(torch.randint(8, ()).item())
            m = np.rot90(m, k % 4)
            if k >= 4:
                m = m[:, ::-1]
        img = wafer_map_image(np.ascontiguousarray(m), self.image_size, self.channels)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "grade": torch.tensor(rec.label, dtype=torch.long),
            "text": "",
            "path": rec.source,
        }
