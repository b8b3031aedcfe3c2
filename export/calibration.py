"""Real images for parity checks and INT8 calibration: the user's folder, or ELPV cells from the installed package."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from lineside.vision.preprocess import frames_to_batch

__all__ = ["real_images", "CalibrationError"]

log = logging.getLogger(__name__)


class CalibrationError(RuntimeError):
    """No usable real images for a parity check or calibration."""


def real_images(
    calib: str | os.PathLike | None, size: Sequence[int], channels: int, n: int = 32, split: str = "train", seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Up to ``n`` real images as uint8 (N, C, H, W) at ``size``, and their paths.

    Args:
        calib: a folder / glob / CSV manifest of the user's own images; None = built-in ELPV cells
            (module-block ``split``, so calibration never sees test modules).
        size: (H, W) frame size of the artefact.
        channels: 1 or 3.
        n: how many; spread evenly over the sorted inputs.
        split: ELPV block split to draw from when ``calib`` is None.
    """
    from lineside.vision.io import collect_inputs, read_image

    if calib is None:
        from lineside.vision.elpv import elpv_records
        from lineside.vision.splits import block_split

        records = elpv_records()
        idx = block_split([r.label for r in records], 60, 0.1, 0.2, seed)[split]
        paths = [records[i].path for i in sorted(idx)]
        source = f"ELPV {split} blocks (elpv-dataset package)"
    else:
        paths = collect_inputs(os.fspath(calib))
        source = os.fspath(calib)
    if not paths:
        raise CalibrationError(f"{source}: no images found")
    pick = np.linspace(0, len(paths) - 1, num=min(n, len(paths))).round().astype(int)
    frames, used, bad = [], [], 0
    for i in dict.fromkeys(pick.tolist()):
        try:
            frames.append(read_image(paths[i], channels))
            used.append(paths[i])
        except Exception as exc:  # noqa: BLE001 - a bad calibration file is skipped, with a count
            bad += 1
            log.warning("calibration: skipped %s", exc)
    if not frames:
        raise CalibrationError(f"{source}: none of {len(pick)} images could be read")
    if bad:
        log.warning("calibration: %d of %d images skipped", bad, len(pick))
    return frames_to_batch(frames, size), used
