"""Box-labelled images: the record, the sample dict, and the box/mask checks shared by every reader.

Every box reader (:mod:`lineside.vision.box_formats`) turns its format into
:class:`DetectionRecord` lists; :func:`load_detection_sample` turns a record into the one
sample dict the localization side consumes:

``image``   (H, W, C) ``uint8``
``boxes``   (M, 4) ``float32``, ``x1, y1, x2, y2`` in pixels of *this* image, pixel-edge
            coordinates (``x2``/``y2`` exclusive: a box over columns 3..5 is ``3, ., 6, .``),
            ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``; M may be 0 (a defect-free image)
``labels``  (M,) ``int64``, index into the dataset's class names
``mask``    (H, W) ``uint8`` with values 0/1, only when the record has a mask
``path``    the image path (``str``)

Error policy (the same for every format):

- a malformed annotation file (bad XML/JSON, wrong field count, non-numeric or non-finite
  coordinate), an unknown class, a box entirely outside its image, a mask whose size differs
  from its image, or a missing image raise :class:`DetectionFormatError` naming the file
  (and line where there is one);
- a box partly outside its image is clipped to the image and counted;
- a degenerate box (zero or negative width or height, before or after clipping, or
  narrower than ``min_size``) is dropped and counted;
- counts are logged once per reader call (``logging`` warning, logger
  ``lineside.vision.box_records``) with the first few files, so a big dataset reports
  "clipped 12 boxes in 9 files" instead of 12 lines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from lineside.vision.io import ImageReadError, read_image

__all__ = [
    "BoxAudit",
    "DetectionFormatError",
    "DetectionRecord",
    "boxes_from_mask",
    "clean_boxes",
    "image_size",
    "load_detection_sample",
    "read_binary_mask",
]

logger = logging.getLogger(__name__)


class DetectionFormatError(ValueError):
    """A box/mask annotation (or the image it belongs to) cannot be used; the message starts with the file."""


@dataclass(frozen=True, eq=False)
class DetectionRecord:
    """One image with its boxes (already checked, clipped, in pixels).

    Attributes:
        path: image file.
        boxes: (M, 4) float32 ``x1, y1, x2, y2`` pixel-edge coordinates.
        labels: (M,) int64 class indices.
        width, height: image size in pixels (from the annotation or the image header).
        mask_path: binary mask file beside the image (same size), or ``None``.
        group: physical object the image shows (magnetic tile ``tile_group``, DeepPCB board
            group); splits keep a group on one side. ``None`` when unknown.
        image_class: image-level class name (NEU file prefix, magnetic tile folder); may be "".
        annotation: the annotation file the boxes came from ("" for none).
    """

    path: str
    boxes: np.ndarray
    labels: np.ndarray
    width: int
    height: int
    mask_path: str | None = None
    group: str | None = None
    image_class: str = ""
    annotation: str = ""

    @property
    def num_boxes(self) -> int:
        return int(len(self.labels))


@dataclass
class BoxAudit:
    """Counts of boxes clipped and dropped (and images skipped) over one reader call."""

    source: str = ""
    clipped: int = 0
    dropped: int = 0
    skipped: int = 0
    clipped_files: list[str] = field(default_factory=list)
    dropped_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        self.skipped += 1
        self.skipped_files.append(f"{path} ({reason})")

    def log(self) -> None:
        """One warning per kind of change, naming up to 3 files."""

        def few(files: list[str]) -> str:
            return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")

        if self.clipped:
            logger.warning("%s: clipped %d boxes partly outside their image in %d files: %s", self.source, self.clipped, len(self.clipped_files), few(self.clipped_files))
        if self.dropped:
            logger.warning("%s: dropped %d degenerate boxes in %d files: %s", self.source, self.dropped, len(self.dropped_files), few(self.dropped_files))
        if self.skipped:
            logger.warning("%s: skipped %d images: %s", self.source, self.skipped, few(self.skipped_files))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the image header (no decode); :class:`DetectionFormatError` if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise DetectionFormatError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return int(im.width), int(im.height)
    except (UnidentifiedImageError, OSError) as exc:
        raise DetectionFormatError(f"{p}: not a readable image ({exc})") from None


def clean_boxes(
    boxes: np.ndarray,
    width: int,
    height: int,
    source: str | os.PathLike,
    audit: BoxAudit | None = None,
    min_size: float = 1.0,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check, clip and filter (M, 4) xyxy pixel boxes for an image of ``width`` x ``height``.

    Returns ``(boxes float32 (K, 4), keep indices int64 (K,))``. Non-finite coordinates or a
    box with no overlap with the image raise :class:`DetectionFormatError` naming ``source``;
    partial boxes are clipped; boxes with width or height below ``min_size`` (after clipping)
    are dropped. Clip/drop counts go to ``audit``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise DetectionFormatError(f"{source}: box coordinates must be finite numbers, got {b[~np.isfinite(b).all(1)].tolist()}")
    proper = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    outside = proper & ((b[:, 0] >= width) | (b[:, 1] >= height) | (b[:, 2] <= 0) | (b[:, 3] <= 0))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DetectionFormatError(
            f"{source}: box {i} {b[i].tolist()} lies entirely outside the {width}x{height} image (wrong image or coordinate format?)"
        )
    clipped = b.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    changed = proper & (clipped != b).any(axis=1)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    if audit is not None:
        if changed.any():
            audit.clipped += int(changed.sum())
            audit.clipped_files.append(str(source))
        if (~keep).any():
            audit.dropped += int((~keep).sum())
            audit.dropped_files.append(str(source))
    idx = np.flatnonzero(keep).astype(np.int64)
    return clipped[idx].astype(np.float32).reshape(-1, 4), idx


def read_binary_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Read a mask image as (H, W) ``uint8`` 0/1 (pixel > ``threshold`` is 1; masks with
    anti-aliased edges are common). :class:`DetectionFormatError` names the file on failure."""
    try:
        m = read_image(path, channels=1)[:, :, 0]
    except ImageReadError as exc:
        raise DetectionFormatError(f"mask {exc}") from None
    return (m > threshold).astype(np.uint8)


def boxes_from_mask(mask: np.ndarray, min_area: int = 1, connectivity: int = 8) -> np.ndarray:
    """One xyxy pixel-edge box per connected region of a (H, W) 0/1 mask: (K, 4) float32.

    Regions with fewer than ``min_area`` pixels are ignored. Uses
    ``cv2.connectedComponentsWithStats``; regions are ordered by label (top-to-bottom scan).
    """
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=connectivity)
    s = stats[1:]
    s = s[s[:, cv2.CC_STAT_AREA] >= min_area]
    x, y, w, h = (s[:, k].astype(np.float32) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return np.stack([x, y, x + w, y + h], axis=1).reshape(-1, 4).astype(np.float32)


def load_detection_sample(record: DetectionRecord, channels: int = 3) -> dict:
    """Decode a record into the sample dict documented in this module (numpy arrays).

    Raises :class:`DetectionFormatError` (image or mask unreadable, or a size that differs from
    the annotation's) naming the file.
    """
    try:
        image = read_image(record.path, channels)
    except ImageReadError as exc:
        raise DetectionFormatError(str(exc)) from None
    h, w = image.shape[:2]
    if (w, h) != (record.width, record.height):
        raise DetectionFormatError(
            f"{record.path}: image is {w}x{h} but its annotation {record.annotation or '(record)'} says {record.width}x{record.height}"
        )
    sample = {
        "image": image,
        "boxes": np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(record.labels, dtype=np.int64).reshape(-1),
        "path": record.path,
    }
    if record.mask_path is not None:
        mask = read_binary_mask(record.mask_path)
        if mask.shape != (h, w):
            raise DetectionFormatError(f"{record.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {record.path} is {w}x{h}")
        sample["mask"] = mask
    return sample
