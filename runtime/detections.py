"""Boxes and heatmaps of a backend's outputs → per-image records and overlays (shared by ``score`` and ``station``).

A backend's box outputs are found by their kinds in the metadata (``box``, ``box_score``,
``box_label``: :mod:`fusion.box_decoder`), its heatmap by name: ``defect_heatmap`` (the
localization head's, trained on masks or boxes) before ``grade_heatmap`` (the grading head's
class-activation map, :mod:`fusion.grade_heatmap`). Boxes come out of the model in pixels of the
frame it was given (its ``input_size``); :func:`box_records` maps them back to the pixels of
the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lineside.fusion.box_decoder import BOX_SCORE_THRESHOLD

__all__ = ["BOX_SCORE_THRESHOLD", "OutputLayout", "box_records", "heatmap_to_image", "blend_heatmap", "draw_boxes"]

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
