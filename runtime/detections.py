"""Boxes and heatmaps of a backend's outputs → per-image records and overlays (shared by ``score`` and ``station``).

A backend's box outputs are found by their kinds in the metadata (``box``, ``box_score``,
``box_label``: :mod:`fusion.box_decoder`), its heatmap by name: ``defect_heatmap`` (the
localization head's, trained on masks or boxes) before ``grade_heatmap`` (the grading head's
class-activation map, :mod:`fusion.grade_heatmap`). Boxes come out of the model in pixels of the
frame it was given (its ``input_size``); :func:`box_records` maps them back to the pixels of
the original image.

A segmentation model's ``defect_masks`` (N, K, h, w) (foreground probabilities at a stride of the
training size, :mod:`fusion.segmentation_decoder`) are described by :class:`MaskLayout`;
:func:`class_index_map` turns one frame's masks into a class index per pixel of the original
image (0 background), which ``score --masks`` saves and :func:`colour_classes` paints on overlays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lineside.fusion.box_decoder import BOX_SCORE_THRESHOLD

__all__ = ["BOX_SCORE_THRESHOLD", "OutputLayout", "MaskLayout", "box_records", "class_index_map", "colour_classes",
           "heatmap_to_image", "blend_heatmap", "draw_boxes"]

HEATMAP_NAMES = ("defect_heatmap", "grade_heatmap")  # preference order

# box colours by label (cycled)
_BOX_COLOURS = [(0, 200, 255), (255, 80, 200), (255, 220, 0), (120, 255, 80), (255, 120, 40), (160, 120, 255)]


@dataclass(frozen=True)
class OutputLayout:
    """Which of a backend's outputs hold boxes and a heatmap (None where it has none)."""

    boxes: str | None = None
    scores: str | None = None
    labels: str | None = None
    heatmap: str | None = None
    box_class_names: tuple = ()

    @classmethod
    def of(cls, specs: Sequence[dict], box_class_names: Sequence[str] | None = None) -> "OutputLayout":
        names = [s["name"] for s in specs]
        by_kind = {s.get("kind"): s["name"] for s in specs}
        boxes = by_kind.get("box") or ("boxes" if "boxes" in names else None)
        scores = by_kind.get("box_score") or ("box_scores" if "box_scores" in names else None)
        labels = by_kind.get("box_label") or ("box_labels" if "box_labels" in names else None)
        if not (boxes and scores and labels):
            boxes = scores = labels = None
        heatmap = next((n for n in HEATMAP_NAMES if n in names), None)
        return cls(boxes, scores, labels, heatmap, tuple(box_class_names or ()))

    @property
    def has_boxes(self) -> bool:
        return self.boxes is not None

    def names(self) -> set[str]:
        """The output names this layout covers (left out of generic per-frame output lists)."""
        return {n for n in (self.boxes, self.scores, self.labels, *HEATMAP_NAMES) if n}


@dataclass(frozen=True)
class MaskLayout:
    """A backend's ``defect_masks`` output: its name, the K foreground class names (channel k = class
    index k + 1), the structure classes (segmented, not defects: ``busbar``), the stride in pixels
    of the training size and that size (H, W). Frames of any size are resized to the training size
    inside the graph, so a cell covers ``stride · original / train_size`` original pixels."""

    name: str
    class_names: tuple
    structure_classes: tuple
    stride: float
    train_size: tuple

    @classmethod
    def of(cls, specs: Sequence[dict], metadata: dict) -> "MaskLayout | None":
        """The first ``defect_masks*`` output of ``specs``; None for a model without one. Class names and
        stride come from ``metadata["masks"]``; older exports: names from the output's description
        (``channels a, b, …``), stride = training size / map size."""
        spec = next((s for s in specs if s["name"].startswith("defect_masks")), None)
        if spec is None:
            return None
        k, h = int(spec["shape"][1]), int(spec["shape"][2])
        prep = metadata.get("preprocessing") or {}
        train = tuple(int(v) for v in (prep.get("train_size") or prep.get("input_size") or (h, spec["shape"][3])))
        info = (metadata.get("masks") or {}).get(spec["name"]) or {}
        names = list(info.get("class_names") or [])
        if len(names) != k:
            described = str(spec.get("description", "")).rpartition("channels ")[2]
            names = [n.strip() for n in described.split(",")] if described else []
            names = names if len(names) == k and all(names) else [f"class{i + 1}" for i in range(k)]
        structure = tuple(info.get("structure_classes", ("busbar",)))
        stride = float(info.get("stride") or train[0] / h)
        return cls(spec["name"], tuple(names), tuple(n for n in structure if n in names), stride, train)

    @property
    def index_names(self) -> dict[int, str]:
        """Class index → name, 0 background (the values of :func:`class_index_map`)."""
        return {0: "background", **{k + 1: n for k, n in enumerate(self.class_names)}}

    def scale(self, image_size: Sequence[int]) -> tuple[float, float]:
        """(sy, sx): original-image pixels per training-size pixel."""
        return float(image_size[0]) / self.train_size[0], float(image_size[1]) / self.train_size[1]


def class_index_map(masks: np.ndarray, layout: MaskLayout, image_size: Sequence[int]) -> np.ndarray:
    """One frame's ``defect_masks`` (K, h, w) → (H, W) uint8 class index per pixel of the original image.

    The index is the argmax over background (1 − Σ foreground) and the K classes, 0 background,
    k = class ``layout.class_names[k - 1]``; each pixel takes its cell's value (nearest neighbour:
    pixel centre → training-size pixel → cell)."""
    fg = np.asarray(masks, np.float32)
    probs = np.concatenate([1.0 - fg.sum(0, keepdims=True), fg], 0)
    cells = probs.argmax(0).astype(np.uint8)
    h0, w0 = int(image_size[0]), int(image_size[1])
    sy, sx = layout.scale((h0, w0))
    rows = np.clip(((np.arange(h0) + 0.5) / sy / layout.stride).astype(np.int64), 0, cells.shape[0] - 1)
    cols = np.clip(((np.arange(w0) + 0.5) / sx / layout.stride).astype(np.int64), 0, cells.shape[1] - 1)
    return cells[rows[:, None], cols[None, :]]


# class colours on overlays; cracks in red, apart from the red→yellow heatmap and the box colours
_CLASS_COLOURS = {"crack": (255, 0, 60), "crossing": (255, 0, 255), "dark_area": (40, 90, 255)}
_OTHER_CLASS_COLOURS = [(0, 230, 160), (255, 150, 0), (150, 60, 255)]


def colour_classes(image: Image.Image, index_map: np.ndarray, layout: MaskLayout, strength: float = 0.65) -> Image.Image:
    """``image`` with the defect classes of ``index_map`` (:func:`class_index_map`) painted in their
    colours at opacity ``strength`` (crack red, crossing magenta, dark area blue); background and
    structure classes stay clear. The map is resized (nearest) to the image if their sizes differ."""
    idx = Image.fromarray(np.asarray(index_map, np.uint8))
    if idx.size != image.size:
        idx = idx.resize(image.size, Image.NEAREST)
    idx = np.asarray(idx)
    base = np.asarray(image.convert("RGB"), np.float32)
    others = iter(_OTHER_CLASS_COLOURS * 4)
    for k, name in enumerate(layout.class_names, start=1):
        colour = _CLASS_COLOURS.get(name) or next(others)
        hit = idx == k
        if name in layout.structure_classes or not hit.any():
            continue
        base[hit] = base[hit] * (1 - strength) + np.asarray(colour, np.float32) * strength
    return Image.fromarray(base.round().astype(np.uint8))


def box_records(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    frame_size: Sequence[int],
    image_size: Sequence[int],
    threshold: float = BOX_SCORE_THRESHOLD,
) -> list[dict]:
    """One frame's top-K boxes → ``[{"label": name, "score": s, "box": [x1, y1, x2, y2]}, …]``.

    Args:
        boxes: (K, 4) xyxy in pixels of the frame the model was given.
        scores: (K,) descending.
        labels: (K,) class indices.
        class_names: box class names (index = label; a missing name becomes the index as text).
        frame_size: (H, W) of the frame the model was given (the backend's ``input_size``).
        image_size: (H, W) of the original image: boxes are scaled to its pixels.
        threshold: boxes scoring below it are left out.

    Returns:
        The boxes scoring at least ``threshold``, best first, coordinates rounded to 0.1 px and
        clipped to the image, scores to 4 decimals.
    """
    sy = float(image_size[0]) / float(frame_size[0])
    sx = float(image_size[1]) / float(frame_size[1])
    out = []
    for box, score, label in zip(np.asarray(boxes, np.float64), np.asarray(scores, np.float64), np.asarray(labels)):
        if not score >= threshold:
            continue
        x1, y1, x2, y2 = (float(np.clip(v * s, 0.0, lim)) for v, s, lim in
                          zip(box, (sx, sy, sx, sy), (image_size[1], image_size[0], image_size[1], image_size[0])))
        k = int(label)
        name = class_names[k] if 0 <= k < len(class_names) else str(k)
        out.append({"label": name, "score": round(float(score), 4), "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]})
    return out


def heatmap_to_image(heat: np.ndarray, size: Sequence[int]) -> Image.Image:
    """A (h, w) or (1, h, w) heatmap in [0, 1] → an 8-bit grayscale image of ``size`` (W, H), bilinear."""
    h = np.clip(np.asarray(heat, np.float32).reshape(np.asarray(heat).shape[-2:]), 0.0, 1.0)
    return Image.fromarray(h, mode="F").resize((int(size[0]), int(size[1])), Image.BILINEAR).point(lambda v: v * 255).convert("L")


def blend_heatmap(image: Image.Image, heat: np.ndarray, strength: float = 0.6) -> Image.Image:
    """``image`` (RGB) with the heatmap laid over it in red→yellow, opacity ``strength`` × heat (0 stays clear)."""
    alpha = np.asarray(heatmap_to_image(heat, image.size), np.float32) / 255.0  # (H, W)
    colour = np.stack([np.full_like(alpha, 255.0), 255.0 * np.clip(2 * alpha - 1, 0, 1), np.zeros_like(alpha)], -1)
    base = np.asarray(image.convert("RGB"), np.float32)
    a = (strength * alpha)[..., None]
    return Image.fromarray((base * (1 - a) + colour * a).round().astype(np.uint8))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[dict], class_names: Sequence[str] = ()) -> Image.Image:
    """Draw :func:`box_records` boxes (original-image pixels) with ``label score`` captions, in place."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    width = max(1, min(w, h) // 150)
    font = _font(max(10, min(w, h) // 25))
    names = list(class_names)
    for b in boxes:
        k = names.index(b["label"]) if b["label"] in names else sum(map(ord, str(b["label"])))
        colour = _BOX_COLOURS[k % len(_BOX_COLOURS)]
        x1, y1, x2, y2 = b["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{b['label']} {b['score']:.2f}"
        tb = draw.textbbox((x1, y1), text, font=font)
        th = tb[3] - tb[1]
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1 + width
        tb = draw.textbbox((x1 + width, ty), text, font=font)
        draw.rectangle(tb, fill=(0, 0, 0))
        draw.text((x1 + width, ty), text, fill=colour, font=font)
    return image
