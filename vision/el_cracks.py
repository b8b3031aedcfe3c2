"""EL crack segmentation cells: the manifest reader, the module-level split and
:class:`ElCracksDataset` (``lineside.vision.el_cracks.ElCracksDataset``).

The data (``../shared/data/el_cracks``, see its ``MANIFEST.md``): 400×400 electroluminescence cells
with one class index per mask pixel, 0 background, 1 dark (inactive) area, 2 crack crossing,
3 crack, 4 busbar (cell structure, not a defect). ``manifest.csv`` has ``path, mask, module,
classes_present`` (paths relative to the CSV). Cells of one module never straddle splits.

Per sample (:class:`ElCracksDataset`):

``image``     (C, H, W) ``uint8`` tensor at the training size, resized with lineside's one resize
              (:class:`vision.transforms.FrameResize`); normalisation lives in the model
``seg_mask``  (H, W) ``int64`` class index per pixel (nearest-neighbour resize, moved with the image
              by every flip)
``has_seg``   ``bool`` tensor, True (every cell here has a mask; other data sets give False and a
              zero mask, and add no segmentation loss)
``grade``     ``int64`` -1 (no grade label)
``path``      ``str``

Per batch (:func:`segmentation_collate`): ``image`` (B, C, H, W) uint8, ``seg_mask`` (B, H, W)
int64, ``has_seg`` (B,) bool, ``grade`` (B,) int64, ``path`` list of B ``str``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from lineside.vision.io import ImageReadError, read_image  # noqa: E402
from lineside.vision.transforms import FrameResize  # noqa: E402

__all__ = [
    "EL_CRACK_CLASSES",
    "EL_STRUCTURE_CLASSES",
    "ElCrackRecord",
    "ElCracksDataset",
    "build_segmentation_eval_transform",
    "build_segmentation_train_transform",
    "module_split",
    "read_el_cracks",
    "read_mask",
    "segmentation_collate",
]

EL_CRACK_CLASSES = ("background", "dark_area", "crossing", "crack", "busbar")  # index = mask value
EL_STRUCTURE_CLASSES = ("busbar",)  # cell structure: segmented, but not a defect


@dataclass(frozen=True)
class ElCrackRecord:
    """One cell: image and mask paths (absolute), its module and the mask values present."""

    path: str
    mask: str
    module: str
    classes_present: tuple[int, ...] = ()


def read_el_cracks(root: str | os.PathLike) -> list[ElCrackRecord]:
    """``root/manifest.csv`` → records (paths resolved against ``root``). A missing manifest, a
    missing column or a row naming a file that does not exist raises, naming the file and row."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found (expected path,mask,module,classes_present)")
    records = []
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "mask", "module"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            image, mask = root / row["path"], root / row["mask"]
            for p in (image, mask):
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: file not found ({manifest}, line {line})")
            present = tuple(int(v) for v in str(row.get("classes_present") or "").replace(";", " ").split() if v.strip())
            records.append(ElCrackRecord(str(image), str(mask), row["module"], present))
    if not records:
        raise ValueError(f"{manifest}: no rows")
    return records


def module_split(records: Sequence[ElCrackRecord], val_fraction: float = 0.1, test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, list[ElCrackRecord]]:
    """Whole modules to train / val / test (seeded shuffle of the sorted module names, then dealt
    to test, then val, until each holds its fraction of the *cells*; the rest train)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be fractions summing below 1")
    by_module: dict[str, list[ElCrackRecord]] = {}
    for r in records:
        by_module.setdefault(r.module, []).append(r)
    names = sorted(by_module)
    order = [names[k] for k in np.random.default_rng(seed).permutation(len(names))]
    total = len(records)
    out: dict[str, list[ElCrackRecord]] = {"train": [], "val": [], "test": []}
    filled = {"test": 0, "val": 0}
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    for m in order:
        split = next((s for s in ("test", "val") if filled[s] + len(by_module[m]) / 2 <= targets[s]), "train")
        if split != "train":
            filled[split] += len(by_module[m])
        out[split].extend(by_module[m])
    return out


def read_mask(path: str | os.PathLike, num_values: int = len(EL_CRACK_CLASSES)) -> np.ndarray:
    """A single-channel class-index PNG → (H, W) ``uint8``; errors name the file (unreadable,
    more than one channel, values ≥ ``num_values``)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: mask file not found")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ImageReadError(f"{p}: mask must be single-channel class indices, got mode {im.mode}")
            mask = np.asarray(im)
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises many types on corrupt files
        raise ImageReadError(f"{p}: not a readable mask ({exc})") from None
    if mask.ndim != 2:
        raise ImageReadError(f"{p}: mask must be (H, W), got shape {mask.shape}")
    if mask.size and int(mask.max()) >= num_values:
        raise ImageReadError(f"{p}: mask value {int(mask.max())} outside 0..{num_values - 1}")
    return np.ascontiguousarray(mask.astype(np.uint8))


def _compose(ops: Sequence, seed: int | None = None) -> A.Compose:
    return A.Compose([*ops, ToTensorV2()], seed=seed)


def build_segmentation_eval_transform(image_size: int | tuple[int, int]) -> A.Compose:
    """Resize to ``image_size`` (frames: :class:`FrameResize`; masks: nearest neighbour)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return _compose([FrameResize(h, w, mask_interpolation=0)])


def build_segmentation_train_transform(image_size: int | tuple[int, int], seed: int | None = None) -> A.Compose:
    """Resize, then the 8 dihedral views of a cell (masks move with the frame), brightness /
    contrast and gamma (frames only). No rotation by arbitrary angles: it would blur 1-px cracks."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return _compose([
        FrameResize(h, w, mask_interpolation=0),
        A.D4(p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
    ], seed=seed)


class ElCracksDataset(Dataset):
    """Records → the per-sample dict in this module's docstring.

    Args:
        records: from :func:`read_el_cracks` (or any list of :class:`ElCrackRecord`).
        transform: a pipeline from the builders here, called as ``transform(image=, mask=)``;
            ``None`` keeps the 400×400 source size.
        channels: 1 (EL is grey; stored as RGB JPEGs of a grey image) or 3.
    """

    def __init__(self, records: Sequence[ElCrackRecord], transform: Callable | None = None, channels: int = 1) -> None:
        self.records = list(records)
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = read_image(r.path, self.channels)
        mask = read_mask(r.mask)
        if mask.shape != image.shape[:2]:
            raise ImageReadError(f"{r.mask}: mask {mask.shape} differs from its image {r.path} {image.shape[:2]}")
        return segmentation_sample(image, mask, self.transform, r.path)


def segmentation_sample(image: np.ndarray, mask: np.ndarray, transform: Callable | None, path: str) -> dict:
    """One segmentation sample: ``image`` (H, W, C) uint8 and its class-index ``mask`` (H, W) through
    ``transform`` (albumentations-style ``image=, mask=``) → ``image`` (C, H, W), ``seg_mask`` int64,
    ``has_seg`` True, ``grade`` -1, ``path``."""
    if transform is not None:
        t = transform(image=image, mask=mask)
        img, m = t["image"], t["mask"]
    else:
        img, m = torch.from_numpy(image).permute(2, 0, 1), mask
    img = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    m = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(m))
    return {"image": img.contiguous(), "seg_mask": m.to(torch.int64), "has_seg": torch.tensor(True),
            "grade": torch.tensor(-1, dtype=torch.int64), "path": path}


def segmentation_collate(samples: Sequence[dict]) -> dict:
    """Stack frames, masks, ``has_seg`` and ``grade`` (keys in this module's docstring); a sample
    without ``seg_mask`` gets a zero mask and ``has_seg`` False."""
    if not samples:
        raise ValueError("segmentation_collate got an empty batch")
    images = [s["image"] for s in samples]
    if len({tuple(i.shape) for i in images}) > 1:
        raise ValueError(f"images differ in shape {sorted({tuple(i.shape) for i in images})}; end the pipeline with a resize")
    _, h, w = images[0].shape
    masks = torch.stack([s["seg_mask"].to(torch.int64) if "seg_mask" in s else torch.zeros(h, w, dtype=torch.int64) for s in samples])
    has = torch.tensor([bool(s.get("has_seg", "seg_mask" in s)) for s in samples], dtype=torch.bool)
    grade = torch.tensor([int(s.get("grade", -1)) for s in samples], dtype=torch.int64)
    return {"image": torch.stack(images), "seg_mask": masks, "has_seg": has, "grade": grade, "path": [s.get("path", "") for s in samples]}
