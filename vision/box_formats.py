"""Readers for the box and mask label formats users have → :class:`DetectionRecord` lists.

Each reader returns ``(records, class_names)`` and follows the error policy in
:mod:`lineside.vision.box_records` (malformed file / unknown class / box wholly outside →
:class:`DetectionFormatError` naming the file; partial boxes clipped and degenerate ones
dropped, with counts logged once per call).

Generic formats:

- :func:`read_voc`: Pascal VOC XML (``object/{name, bndbox/{xmin,ymin,xmax,ymax}}``);
- :func:`read_coco`: COCO JSON (``images``, ``annotations`` with ``bbox = [x, y, w, h]``,
  ``categories``), the usual labelling-tool export;
- :func:`read_yolo` / :func:`read_yolo_data_yaml`: YOLO txt (``class cx cy w h`` normalised
  to 0..1, one object per line; class names from a list or ``data.yaml``);
- :func:`read_mask_folder`: image + same-size binary mask pairs, boxes from the mask's
  connected regions (and the mask kept for mask supervision);
- :func:`read_deeppcb_txt`: DeepPCB's ``x1 y1 x2 y2 type`` lines.

Dataset layouts in ``../shared/data``: :func:`read_neu_det`, :func:`read_magnetic_tile`,
:func:`read_deeppcb` (with their class-name constants).
"""

from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

from lineside.vision.box_records import (
    BoxAudit,
    DetectionFormatError,
    DetectionRecord,
    boxes_from_mask,
    clean_boxes,
    image_size,
    read_binary_mask,
)
from lineside.vision.io import IMAGE_EXTENSIONS, is_image_file

__all__ = [
    "DEEPPCB_CLASSES",
    "MAGNETIC_TILE_CLASSES",
    "NEU_DET_CLASSES",
    "read_coco",
    "read_deeppcb",
    "read_deeppcb_txt",
    "read_magnetic_tile",
    "read_mask_folder",
    "read_neu_det",
    "read_voc",
    "read_yolo",
    "read_yolo_data_yaml",
]

NEU_DET_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
DEEPPCB_CLASSES = ("open", "short", "mousebite", "spur", "copper", "pin-hole")  # DeepPCB type 1..6
MAGNETIC_TILE_CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")  # MT_Free images have no boxes


def _class_index(names: Sequence[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


def _find_image(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it is a file, else ``folder/<stem>.<any image extension>``."""
    p = folder / name
    if p.is_file() and is_image_file(p):
        return p
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        q = folder / f"{stem}{ext}"
        if q.is_file():
            return q
    return None


def _labels(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- Pascal VOC


def _voc_number(obj: ET.Element, tag: str, xml_path: Path) -> float:
    text = obj.findtext(f"bndbox/{tag}")
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DetectionFormatError(f"{xml_path}: object {obj.findtext('name')!r} has bndbox/{tag} {text!r}, not a number") from None


def _parse_voc(xml_path: Path) -> tuple[str | None, int | None, int | None, list[tuple[str, list[float]]]]:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DetectionFormatError(f"{xml_path}: malformed XML ({exc})") from None
    if root.tag != "annotation":
        raise DetectionFormatError(f"{xml_path}: root element is <{root.tag}>, expected Pascal VOC <annotation>")
    w, h = root.findtext("size/width"), root.findtext("size/height")
    try:
        width, height = (int(float(w)), int(float(h))) if w and h else (None, None)
    except ValueError:
        raise DetectionFormatError(f"{xml_path}: size/width {w!r} or size/height {h!r} is not a number") from None
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DetectionFormatError(f"{xml_path}: an <object> has no <name>")
        if obj.find("bndbox") is None:
            raise DetectionFormatError(f"{xml_path}: object {name!r} has no <bndbox>")
        objects.append((name, [_voc_number(obj, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax")]))
    return root.findtext("filename"), width, height, objects


def read_voc(
    annotations: str | os.PathLike | Iterable[str | os.PathLike],
    image_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    min_size: float = 1.0,
) -> tuple[list[DetectionRecord], list[str]]:
    """Pascal VOC XML files (a folder of ``*.xml`` or a list of files) with images in ``image_dir``.

    The image is ``image_dir/<filename>`` (``<filename>`` without an extension, as some NEU-DET
    files have, is matched against any image extension; no ``<filename>`` → the XML's stem).
    ``xmax``/``ymax`` are taken as exclusive pixel edges. ``class_names`` fixes the class order
    (a name outside it is an error); without it the sorted set of names found is used.
    The image size comes from ``<size>`` (the image header when absent).
    """
    if isinstance(annotations, (str, os.PathLike)) and Path(annotations).is_dir():
        files = sorted(Path(annotations).glob("*.xml"))
        if not files:
            raise DetectionFormatError(f"{annotations}: no .xml annotation files in this folder")
    else:
        files = [Path(annotations)] if isinstance(annotations, (str, os.PathLike)) else [Path(f) for f in annotations]
    image_dir = Path(image_dir)
    parsed = [(f, _parse_voc(f)) for f in files]
    if class_names is None:
        class_names = sorted({name for _, (_, _, _, objs) in parsed for name, _ in objs})
    index = _class_index(class_names)
    audit = BoxAudit(f"VOC {files[0].parent if files else image_dir}")
    records = []
    for xml_path, (filename, width, height, objects) in parsed:
        image = _find_image(image_dir, (filename or "").strip() or xml_path.stem)
        if image is None:
            raise DetectionFormatError(f"{xml_path}: its image {filename or xml_path.stem!r} is not in {image_dir}")
        if width is None or height is None or width <= 0 or height <= 0:
            width, height = image_size(image)
        for name, _ in objects:
            if name not in index:
                raise DetectionFormatError(f"{xml_path}: unknown class {name!r}; expected one of {list(class_names)}")
        boxes, keep = clean_boxes(np.array([b for _, b in objects]).reshape(-1, 4), width, height, xml_path, audit, min_size)
        labels = _labels([index[objects[i][0]] for i in keep])
        records.append(DetectionRecord(str(image), boxes, labels, width, height, annotation=str(xml_path)))
    audit.log()
    return records, list(class_names)


def read_neu_det(root: str | os.PathLike) -> tuple[list[DetectionRecord], list[str]]:
    """NEU-DET as in ``../shared/data/neu_det``: ``IMAGES/<class>_<n>.jpg`` + ``ANNOTATIONS/*.xml``.

    Boxes keep their own class (some differ from the file prefix); ``image_class`` is the
    prefix (for stratified splits). Classes: :data:`NEU_DET_CLASSES`.
    """
    root = Path(root)
    records, names = read_voc(root / "ANNOTATIONS", root / "IMAGES", NEU_DET_CLASSES)
    prefix = re.compile(r"^(.*)_\d+$")
    out = []
    for r in records:
        m = prefix.match(Path(r.path).stem)
        out.append(DetectionRecord(r.path, r.boxes, r.labels, r.width, r.height, image_class=m.group(1) if m else "", annotation=r.annotation))
    return out, names


# --------------------------------------------------------------------------- COCO


def read_coco(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    include_crowd: bool = False,
    min_size: float = 1.0,
) -> tuple[list[DetectionRecord], list[str]]:
    """COCO detection JSON: one record per ``images`` entry (images without annotations have no boxes).

    ``file_name`` is relative to ``image_root`` (default: the JSON's folder). Class names are the
    ``categories`` sorted by id; labels index that list. ``bbox`` is ``[x, y, width, height]`` in
    pixels. ``iscrowd`` annotations are left out unless ``include_crowd`` (their count is logged).
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectionFormatError(f"{json_path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DetectionFormatError(f"{json_path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DetectionFormatError(f"{json_path}: not a COCO file (needs 'images' and 'categories' lists)")
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): i for i, c in enumerate(cats)}
        class_names = [str(c["name"]) for c in cats]
        images = {int(im["id"]): im for im in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DetectionFormatError(f"{json_path}: category or image entry lacks a field ({exc!r})") from None
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    crowd = 0
    for k, ann in enumerate(data.get("annotations", [])):
        try:
            image_id, cat_id, bbox = int(ann["image_id"]), int(ann["category_id"]), [float(v) for v in ann["bbox"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectionFormatError(f"{json_path}: annotation #{k} (id {ann.get('id') if isinstance(ann, dict) else '?'}) is malformed ({exc!r})") from None
        if len(bbox) != 4:
            raise DetectionFormatError(f"{json_path}: annotation id {ann.get('id')} has bbox {bbox}, expected [x, y, width, height]")
        if image_id not in images:
            raise DetectionFormatError(f"{json_path}: annotation id {ann.get('id')} refers to unknown image_id {image_id}")
        if cat_id not in cat_index:
            raise DetectionFormatError(f"{json_path}: annotation id {ann.get('id')} has unknown category_id {cat_id}; categories are {sorted(cat_index)}")
        if ann.get("iscrowd", 0) and not include_crowd:
            crowd += 1
            continue
        per_image[image_id].append({"label": cat_index[cat_id], "box": [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]})
    audit = BoxAudit(f"COCO {json_path}")
    records = []
    for image_id, im in images.items():
        name = str(im.get("file_name", ""))
        path = root / name
        if not name or not path.is_file():
            raise DetectionFormatError(f"{json_path}: image id {image_id} file {name!r} not found under {root}")
        width, height = int(im.get("width") or 0), int(im.get("height") or 0)
        if width <= 0 or height <= 0:
            width, height = image_size(path)
        anns = per_image[image_id]
        boxes, keep = clean_boxes(np.array([a["box"] for a in anns]).reshape(-1, 4), width, height, f"{json_path} (image {name})", audit, min_size)
        records.append(DetectionRecord(str(path), boxes, _labels([anns[i]["label"] for i in keep]), width, height, annotation=str(json_path)))
    if crowd:
        audit.skip(json_path, f"{crowd} iscrowd annotations left out")
    audit.log()
    return records, class_names


# --------------------------------------------------------------------------- YOLO


def _yolo_label_path(image: Path, images_dir: Path, labels_dir: Path | None) -> Path:
    if labels_dir is not None:
        return labels_dir / image.relative_to(images_dir).with_suffix(".txt")
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):  # ultralytics: last /images/ → /labels/
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def read_yolo(
    images_dir: str | os.PathLike,
    class_names: Sequence[str],
    labels_dir: str | os.PathLike | None = None,
    min_size: float = 1.0,
) -> tuple[list[DetectionRecord], list[str]]:
    """YOLO txt labels: for each image under ``images_dir`` (recursive) a ``.txt`` with lines
    ``class cx cy w h`` (centre and size normalised to 0..1 by the image size).

    The label file is found as ultralytics does (the last ``images`` folder in the path
    replaced by ``labels``; else beside the image) unless ``labels_dir`` mirrors
    ``images_dir``. A missing or empty label file means an image without objects. A class id
    outside ``class_names`` or a line without exactly 5 numbers is an error naming file:line.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DetectionFormatError(f"{images_dir}: images folder not found")
    images = sorted(p for p in images_dir.rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise DetectionFormatError(f"{images_dir}: no image files")
    labels_root = Path(labels_dir) if labels_dir is not None else None
    audit = BoxAudit(f"YOLO {images_dir}")
    records = []
    for image in images:
        width, height = image_size(image)
        txt = _yolo_label_path(image, images_dir, labels_root)
        boxes, ids = [], []
        if txt.is_file():
            for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 5:
                    raise DetectionFormatError(f"{txt}:{line_no}: expected 'class cx cy w h' (5 fields), got {len(fields)} fields: {line.strip()!r}")
                try:
                    cls = int(fields[0])
                    cx, cy, w, h = (float(v) for v in fields[1:])
                except ValueError:
                    raise DetectionFormatError(f"{txt}:{line_no}: not numbers: {line.strip()!r}") from None
                if not 0 <= cls < len(class_names):
                    raise DetectionFormatError(f"{txt}:{line_no}: unknown class id {cls}; names are 0..{len(class_names) - 1} {list(class_names)}")
                ids.append(cls)
                boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        kept, keep = clean_boxes(np.array(boxes).reshape(-1, 4), width, height, txt, audit, min_size)
        records.append(DetectionRecord(str(image), kept, _labels([ids[i] for i in keep]), width, height, annotation=str(txt) if txt.is_file() else ""))
    audit.log()
    return records, list(class_names)


def read_yolo_data_yaml(data_yaml: str | os.PathLike, split: str = "train") -> tuple[list[DetectionRecord], list[str]]:
    """An ultralytics ``data.yaml`` (``path``, ``train``/``val``/``test`` image folders, ``names``
    as a list or an ``{id: name}`` dict) → the records of ``split`` and the class names."""
    data_yaml = Path(data_yaml)
    try:
        cfg = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectionFormatError(f"{data_yaml}: file not found") from None
    except yaml.YAMLError as exc:
        raise DetectionFormatError(f"{data_yaml}: malformed YAML ({exc})") from None
    if not isinstance(cfg, dict) or "names" not in cfg or split not in cfg:
        raise DetectionFormatError(f"{data_yaml}: needs 'names' and '{split}' keys")
    names = cfg["names"]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except ValueError:
            raise DetectionFormatError(f"{data_yaml}: 'names' keys must be integers") from None
        if ids != list(range(len(ids))):
            raise DetectionFormatError(f"{data_yaml}: 'names' ids must be 0..{len(ids) - 1}, got {ids}")
        names = [str(names[k] if k in names else names[str(k)]) for k in ids]
    base = Path(cfg.get("path") or ".")
    base = base if base.is_absolute() else data_yaml.parent / base
    images_dir = Path(cfg[split])
    return read_yolo(images_dir if images_dir.is_absolute() else base / images_dir, [str(n) for n in names])


# --------------------------------------------------------------------------- masks


def read_mask_folder(
    pairs: Iterable[tuple[str | os.PathLike, str | os.PathLike, str]],
    class_names: Sequence[str],
    empty_masks: str = "skip",
    min_area: int = 1,
    threshold: int = 127,
    groups: dict[str, str] | None = None,
    source: str = "masks",
    connectivity: int = 8,
) -> tuple[list[DetectionRecord], list[str]]:
    """Image/mask pairs → records with one box per connected mask region and the mask kept.

    Args:
        pairs: ``(image_path, mask_path, class_name)``; a ``class_name`` outside
            ``class_names`` means a defect-free image (its mask must be empty: a defect-free
            image with mask pixels is an error).
        class_names: defect classes; every region of a defect image's mask gets its class.
        empty_masks: what to do with a defect image whose mask is empty: ``"skip"`` (leave it
            out, counted in the log), ``"keep"`` (an image without boxes) or ``"error"``.
        min_area: regions with fewer pixels are ignored.
        threshold: mask pixel > threshold is defect (0..255 scale).
        connectivity: 8 (default: diagonal neighbours are one region, so a thin diagonal
            crack stays one box) or 4.
        groups: image path → physical group, stored in ``record.group``.
    """
    if empty_masks not in ("skip", "keep", "error"):
        raise ValueError(f"empty_masks must be 'skip', 'keep' or 'error', got {empty_masks!r}")
    index = _class_index(class_names)
    audit = BoxAudit(source)
    records = []
    for image, mask_path, cls in pairs:
        image, mask_path = Path(image), Path(mask_path)
        width, height = image_size(image)
        mask = read_binary_mask(mask_path, threshold)
        if mask.shape != (height, width):
            raise DetectionFormatError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image} is {width}x{height}")
        boxes = boxes_from_mask(mask, min_area, connectivity)
        if cls not in index and len(boxes):
            raise DetectionFormatError(f"{mask_path}: class {cls!r} is not a defect class {list(class_names)} but the mask has {len(boxes)} regions")
        if cls in index and not len(boxes):
            if empty_masks == "error":
                raise DetectionFormatError(f"{mask_path}: mask of a {cls!r} image is empty (no pixel > {threshold})")
            if empty_masks == "skip":
                audit.skip(mask_path, f"empty mask for class {cls}")
                continue
        labels = _labels([index[cls]] * len(boxes)) if cls in index else _labels([])
        group = (groups or {}).get(str(image))
        records.append(DetectionRecord(str(image), boxes, labels, width, height, mask_path=str(mask_path), group=group, image_class=cls, annotation=str(mask_path)))
    audit.log()
    return records, list(class_names)


def read_magnetic_tile(
    root: str | os.PathLike, empty_masks: str = "skip", min_area: int = 1, connectivity: int = 8
) -> tuple[list[DetectionRecord], list[str]]:
    """Magnetic tile as in ``../shared/data/magnetic_tile``: ``MT_<Class>/Imgs/<stem>.jpg`` with
    the mask ``<stem>.png`` beside it; ``MT_Free`` images are defect-free (no boxes, all-zero mask).

    ``record.group`` is the ``tile_group`` from ``manifest.csv`` when present (one physical tile
    photographed under ~6 lightings; split by it), else the image's own stem. Classes:
    :data:`MAGNETIC_TILE_CLASSES`. Defect images with empty masks are handled per ``empty_masks``
    (the source has two such Uneven images; skipped and logged by default).
    ``manifest.csv``'s ``component_boxes`` were derived with 4-connectivity (288 regions; 285
    with the default 8, where diagonal touching pixels join).
    """
    root = Path(root)
    folders = sorted(d for d in root.glob("MT_*") if d.is_dir())
    if not folders:
        raise DetectionFormatError(f"{root}: no MT_<Class> folders")
    pairs = []
    for d in folders:
        cls = d.name[3:]
        for image in sorted((d / "Imgs").glob("*.jpg")):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                raise DetectionFormatError(f"{image}: its mask {mask.name} is missing")
            pairs.append((str(image), str(mask), cls))
    groups = {}
    manifest = root / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as fh:
            groups = {str(root / r["image_path"]): r["tile_group"] for r in csv.DictReader(fh)}
    groups = {image: groups.get(image, Path(image).stem) for image, _, _ in pairs}
    return read_mask_folder(
        pairs, MAGNETIC_TILE_CLASSES, empty_masks, min_area, groups=groups, source=f"magnetic tile {root}", connectivity=connectivity
    )


# --------------------------------------------------------------------------- DeepPCB


def read_deeppcb_txt(txt: str | os.PathLike, width: int, height: int, audit: BoxAudit | None = None, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One DeepPCB label file: lines ``x1 y1 x2 y2 type`` (type 1..6 = :data:`DEEPPCB_CLASSES`;
    commas also accepted as separators). Returns (boxes (M, 4) float32, labels (M,) int64 0..5)."""
    txt = Path(txt)
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DetectionFormatError(f"{txt}: label file not found") from None
    boxes, ids = [], []
    for line_no, line in enumerate(lines, start=1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields:
            continue
        if len(fields) != 5:
            raise DetectionFormatError(f"{txt}:{line_no}: expected 'x1 y1 x2 y2 type', got {len(fields)} fields: {line.strip()!r}")
        try:
            coords, kind = [float(v) for v in fields[:4]], int(fields[4])
        except ValueError:
            raise DetectionFormatError(f"{txt}:{line_no}: not numbers: {line.strip()!r}") from None
        if not 1 <= kind <= len(DEEPPCB_CLASSES):
            raise DetectionFormatError(f"{txt}:{line_no}: unknown defect type {kind}; DeepPCB types are 1..6 {list(DEEPPCB_CLASSES)}")
        boxes.append(coords)
        ids.append(kind - 1)
    kept, keep = clean_boxes(np.array(boxes).reshape(-1, 4), width, height, txt, audit, min_size)
    return kept, _labels([ids[i] for i in keep])


def read_deeppcb(root: str | os.PathLike) -> tuple[list[DetectionRecord], list[str]]:
    """DeepPCB as in ``../shared/data/deeppcb``: ``PCBData/groupG/G/<id>_test.jpg`` with labels
    ``PCBData/groupG/G_not/<id>.txt``. ``record.group`` is the board group (``groupG``)."""
    root = Path(root)
    base = root / "PCBData" if (root / "PCBData").is_dir() else root
    label_files = sorted(base.glob("group*/*_not/*.txt"))
    if not label_files:
        raise DetectionFormatError(f"{root}: no PCBData/group*/*_not/*.txt label files")
    audit = BoxAudit(f"DeepPCB {root}")
    records = []
    for txt in label_files:
        image = txt.parent.parent / txt.parent.name[: -len("_not")] / f"{txt.stem}_test.jpg"
        if not image.is_file():
            raise DetectionFormatError(f"{txt}: its image {image} is missing")
        width, height = image_size(image)
        boxes, labels = read_deeppcb_txt(txt, width, height, audit)
        records.append(DetectionRecord(str(image), boxes, labels, width, height, group=txt.parent.parent.name, annotation=str(txt)))
    audit.log()
    return records, list(DEEPPCB_CLASSES)
