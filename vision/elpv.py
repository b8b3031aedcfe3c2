"""The ELPV solar-cell electroluminescence dataset, read offline from the ``elpv-dataset`` package.

2,624 cells of 300x300 px (8-bit grayscale) cut from 44 modules; each has a defect probability
p in {0, 1/3, 2/3, 1} given by experts and a cell type (mono/poly). lineside grades them
``round(3 p)`` → 0 ok, 1 mild, 2 moderate, 3 severe. Licence of the images: CC BY-NC-SA 4.0
(Buerhop-Lutz et al. 2018; Deitsch et al. 2019, 2021).

Cells of one module are contiguous in the index order, so :func:`vision.splits.block_split`
keeps whole index blocks together to avoid leaking module conditions into the test set.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from lineside.vision.records import ImageRecord

__all__ = ["ELPV_GRADE_NAMES", "elpv_block_folds", "elpv_root", "elpv_records", "write_elpv_manifest"]

ELPV_GRADE_NAMES = ["ok", "mild", "moderate", "severe"]
_TYPE_TEXT = {"mono": "monocrystalline", "poly": "polycrystalline"}


def elpv_root() -> Path:
    """Folder holding ``labels.csv`` and ``images/`` of the installed ``elpv-dataset`` package."""
    try:
        import elpv_dataset
    except ImportError as exc:  # pragma: no cover - a dependency
        raise RuntimeError("the built-in EL data needs the 'elpv-dataset' package: pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def elpv_records() -> list[ImageRecord]:
    """All 2,624 cells in the dataset's index order, with grade and cell-type text."""
    labels = elpv_root() / "labels.csv"
    records = []
    with open(labels, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise ValueError(f"{labels}:{n}: expected 'path probability type', got {line.strip()!r}")
            rel, prob, cell_type = parts
            grade = int(round(3 * float(prob)))
            records.append(ImageRecord(str(labels.parent / rel), grade, None, _TYPE_TEXT.get(cell_type, cell_type)))
    return records


def elpv_block_folds(folds: int = 5, block_size: int = 60, seed: int = 0) -> tuple[list[ImageRecord], np.ndarray, np.ndarray]:
    """The cross-validation layout ``crossval.py`` trains on, for tools that score ELPV out-of-fold.

    Returns ``(records, order, group)``: ``order`` lists the train + val cells (index order), then
    the test cells of the block split; ``group[i]`` is the fold of ``order[i]`` (0..folds-1) or -1
    for a test cell. Folds are whole module blocks, as in :func:`vision.splits.fold_split`.
    """
    from lineside.vision.splits import block_split, fold_split

    records = elpv_records()
    labels = np.array([r.label for r in records])
    split = block_split(labels, block_size, 0.1, 0.2, seed)
    pool, test = np.array(sorted(split["train"] + split["val"])), np.array(split["test"])
    fold_of = np.empty(len(pool), dtype=int)
    for k in range(folds):
        fold_of[fold_split(labels[pool], folds, k, block_size, seed)["val"]] = k
    return records, np.concatenate([pool, test]), np.concatenate([fold_of, np.full(len(test), -1)])


def write_elpv_manifest(out: str | os.PathLike, indices: list[int] | None = None) -> Path:
    """Write a ``path,label,text`` CSV manifest (absolute paths) for some or all ELPV cells."""
    records = elpv_records()
    chosen = records if indices is None else [records[i] for i in indices]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "text"])
        for r in chosen:
            w.writerow([r.path, ELPV_GRADE_NAMES[r.label], r.text])
    return out

