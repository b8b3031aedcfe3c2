"""Sources of labelled images: ImageFolder trees and CSV manifests → :class:`ImageRecord` lists."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lineside.vision.io import is_image_file

__all__ = ["ImageRecord", "DatasetFormatError", "dedupe_records", "records_from_image_folder", "records_from_manifest"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetFormatError(ValueError):
    """A dataset root or manifest is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled (or unlabelled) image.

    Attributes:
        path: absolute path of the image file.
        label: class index, or -1 when the label is missing.
        split: ``"train"``/``"val"``/``"test"`` when the source fixes it, else ``None``.
        text: free text that goes with the image (cell type, process note); may be empty.
    """

    path: str
    label: int = -1
    split: str | None = None
    text: str = ""


def records_from_image_folder(root: str | os.PathLike, class_names: list[str] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Read ``root/{train,val,test}/<class>/*`` (or ``root/<class>/*`` with no split folders).

    Class names are the sorted union of class folders unless ``class_names`` fixes the order
    (e.g. grades ``ok, mild, moderate, severe``). Returns the records and the class names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: dataset root is not a directory")
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    layout = [(d.name, d) for d in split_dirs] if split_dirs else [(None, root)]
    found = sorted({c.name for _, d in layout for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not found:
        raise DatasetFormatError(f"{root}: no class folders found; expected root/{{train,val,test}}/<class>/*.png or root/<class>/*.png")
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetFormatError(f"{root}: class folders {unknown} are not in class_names {class_names}")
    index = {c: i for i, c in enumerate(class_names)}
    records: list[ImageRecord] = []
    for split, d in layout:
        for cls_dir in sorted(c for c in d.iterdir() if c.is_dir() and c.name in index):
            for f in sorted(cls_dir.rglob("*")):
                if f.is_file() and is_image_file(f):
                    records.append(ImageRecord(str(f.resolve()), index[cls_dir.name], split))
    if not records:
        raise DatasetFormatError(f"{root}: class folders hold no image files")
    return records, list(class_names)


def records_from_manifest(manifest: str | os.PathLike, class_names: list[str] | None = None) -> tuple[list[ImageRecord], list[str]]:
    """Read a CSV manifest with columns ``path,label[,split][,text]``.

    Paths are relative to the CSV's folder (absolute paths are kept). ``label`` is a class
    name or an integer index; an empty label means unlabelled (-1). ``split`` is one of
    train/val/test or empty.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatasetFormatError(f"{manifest}: manifest not found")
    base = manifest.parent.resolve()
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise DatasetFormatError(f"{manifest}: header must contain a 'path' column (path,label[,split][,text]); got {reader.fieldnames}")
        rows = list(reader)
    labels_seen = sorted({(r.get("label") or "").strip() for r in rows} - {""})
    numeric = all(lbl.lstrip("-").isdigit() for lbl in labels_seen)
    if class_names is None:
        class_names = [str(i) for i in range(max(int(x) for x in labels_seen) + 1)] if numeric and labels_seen else labels_seen
    index = {c: i for i, c in enumerate(class_names)}
    records: list[ImageRecord] = []
    for line, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DatasetFormatError(f"{manifest}:{line}: empty path")
        label_text = (row.get("label") or "").strip()
        if not label_text:
            label = -1
        elif label_text in index:
            label = index[label_text]
        elif label_text.lstrip("-").isdigit() and 0 <= int(label_text) < len(class_names):
            label = int(label_text)
        else:
            raise DatasetFormatError(f"{manifest}:{line}: label {label_text!r} is not one of {class_names}")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise DatasetFormatError(f"{manifest}:{line}: split {split!r} must be one of {SPLITS} or empty")
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        records.append(ImageRecord(str(path), label, split, (row.get("text") or "").strip()))
    if not records:
        raise DatasetFormatError(f"{manifest}: manifest has no rows")
    return records, list(class_names)


def dedupe_records(records: list[ImageRecord], source: str = "") -> tuple[list[ImageRecord], int]:
    """Drop records whose file bytes (md5) repeat an earlier record's; returns ``(kept, dropped)``.

    Run it before splitting: byte-identical copies on both sides of a split leak the validation
    or test images into training (radiograph patch sets repeat saturated patches, scraped sets
    repeat images). The first occurrence is kept, in record order. Copies whose labels disagree
    are dropped too and counted in a warning, since no split can score them honestly.
    """
    seen: dict[str, ImageRecord] = {}
    kept: list[ImageRecord] = []
    conflicts = 0
    for r in records:
        try:
            with open(r.path, "rb") as fh:
                digest = hashlib.md5(fh.read()).hexdigest()
        except OSError as e:
            raise DatasetFormatError(f"{r.path}: cannot read image for deduplication ({e})") from e
        first = seen.get(digest)
        if first is None:
            seen[digest] = r
            kept.append(r)
        elif first.label != r.label:
            conflicts += 1
    dropped = len(records) - len(kept)
    if dropped:
        log.info("%s: dropped %d of %d images whose bytes (md5) repeat an earlier image", source or "data", dropped, len(records))
    if conflicts:
        log.warning("%s: %d duplicate images carry another label than their first copy (the first copy's label is kept)", source or "data", conflicts)
    return kept, dropped
