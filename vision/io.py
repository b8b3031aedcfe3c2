"""Image decoding with errors that name the file and say what was wrong."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "InputError", "collect_inputs", "read_image", "is_image_file"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class ImageReadError(ValueError):
    """An input image could not be used; the message names the file and the reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map 16-bit / float images (common for EL and X-ray cameras) to uint8 by range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    a = array.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("image contains NaN or infinite pixel values")
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        hi = float(info.max) if a.max() > 255 else 255.0
        return np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((a - lo) * scale, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """Read an image file as ``uint8`` HxWxC with ``channels`` (1 = grayscale, 3 = RGB).

    Grayscale inputs are replicated to 3 channels and colour inputs averaged to 1 as asked,
    so one model serves grayscale EL cells and RGB cameras alike.

    Raises:
        ImageReadError: missing, empty, unsupported, truncated or corrupt file, or an image
            with no pixels; the message starts with the path.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    if not is_image_file(p):
        raise ImageReadError(
            f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(im)
            elif channels == 1:
                array = np.asarray(im.convert("L"))
            else:
                array = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: not a readable image (corrupt or wrong format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{p}: corrupt or truncated image ({exc})") from None
    try:
        array = _to_uint8(array)
    except ValueError as exc:
        raise ImageReadError(f"{p}: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"{p}: image has no pixels (shape {array.shape})")
    if array.shape[2] != channels:
        array = np.repeat(array, channels, axis=2) if array.shape[2] == 1 else array.mean(axis=2, keepdims=True).astype(np.uint8)
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


class InputError(ValueError):
    """An --input spec (folder, glob, CSV manifest) matched nothing or could not be read."""


def collect_inputs(spec: str) -> list[str]:
    """Expand DIR (recursively, every non-hidden file), a GLOB, or a CSV manifest (``path`` column)."""
    p = Path(spec)
    if p.is_file() and p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise InputError(f"{p}: manifest needs a 'path' column; got {reader.fieldnames}")
            base = p.parent.resolve()
            paths = [str(Path(r["path"]) if Path(r["path"]).is_absolute() else base / r["path"]) for r in reader if r.get("path")]
    elif p.is_dir():
        paths = sorted(
            str(f) for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    else:
        paths = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not paths:
        raise InputError(f"{spec}: no input files found (expected a folder, a glob or a CSV manifest)")
    return paths
