"""Whole-module EL frames: find the cell grid, score the cells as one batch, map the results back.

    lineside score --model best.ckpt --input modules/ --output modules.csv --tile cells --overlays ov/
    lineside score --model model.onnx --input modules/ --output modules.csv --tile cells --grid 6x10
    lineside station --model model.onnx --source /camera/drop --out r.jsonl --tile cells --grid 6x12

A module image goes through :func:`vision.module_grid.find_module_grid` (outline → perspective
correction → gaps between cells; ``--grid ROWSxCOLS`` fixes the counts, either orientation, else
they are found). The cells are cut from the rectified module, resized with
:func:`vision.preprocess.frames_to_batch` (the one resize of every path) and run through the
backend as one batch; :class:`~lineside.runtime.records.RecordBuilder` makes each cell's record, as
for a single cell. Boxes go from cell pixels through the rectified module and the inverse homography
to module-image pixels (a ``quad`` of four corners, and its axis-aligned ``box``); heatmaps are pasted
cell by cell and warped back the same way.

One record per module (:meth:`ModuleTiler.records`):

- ``decision``, ``grade``, ``confidence``, ``probabilities``: the module's worst cell (highest grade,
  then highest confidence); a model without grades leaves them None;
- ``grid``: ``rows``, ``cols``, ``quad`` (module outline, image px, TL TR BR BL), ``contrast``;
- ``grade_counts``: cells per grade name;
- ``cells``: row by row, ``{"row", "col", "quad"}`` and every field of a single cell's record
  (``grade``, ``decision``, ``confidence``, ``probabilities``, ``outputs`` …), with its ``boxes`` as
  ``{"label", "score", "box": [x1, y1, x2, y2], "quad": [[x, y] x 4]}`` in image px;
- ``boxes``: every cell's boxes in one list, best first, each with its ``row`` and ``col``.

An image without a module (no bright quadrilateral, no regular gaps) gets an error naming the file and
what is missing; the run goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lineside.runtime.backend import Backend
from lineside.runtime.detections import (
    BOX_SCORE_THRESHOLD,
    OutputLayout,
    blend_heatmap,
    heatmap_to_image,
)
from lineside.runtime.records import RecordBuilder
from lineside.runtime.results import ScoreSummary, finalise_parquet, open_journal
from lineside.vision.io import InputError, collect_inputs, read_image
from lineside.vision.module_grid import (
    ModuleGrid,
    ModuleGridError,
    find_module_grid,
    parse_grid,
)
from lineside.vision.preprocess import frames_to_batch
from PIL import Image, ImageDraw

__all__ = ["TILE_CHOICES", "ModuleResult", "ModuleTiler", "draw_module_overlay", "grid_arg", "score_modules"]

TILE_CHOICES = ("cells",)

# severity colours: ok → severe (as lineside score's overlays)
_GRADE_COLOURS = [(40, 180, 60), (230, 200, 30), (240, 130, 20), (220, 30, 30)]
_BOX_COLOUR = (0, 200, 255)


def grid_arg(text: str) -> str:
    """argparse ``type`` of ``--grid``: the text, once :func:`~lineside.vision.module_grid.parse_grid` accepts it."""
    import argparse

    try:
        parse_grid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


@dataclass
class ModuleResult:
    """One module: its record, its grid and (when asked for) its heatmap at the image's size."""

    record: dict[str, Any]
    grid: ModuleGrid
    heat: np.ndarray | None = None


def _target(path: str, out_dir: Path, root: str) -> Path:
    """``out_dir``/<path relative to the input folder>.png (the file name alone outside it), as ``lineside score``."""
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    return (out_dir / (rel if not rel.startswith("..") else os.path.basename(path))).with_suffix(".png")


def _save_png(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, target)


def _round(points: np.ndarray) -> list:
    return np.round(np.asarray(points, np.float64), 1).tolist()


class ModuleTiler:
    """Whole-module frames → one record per module (see the module docstring).

    Args:
        grid: ``"6x10"`` / ``(6, 10)`` rows x columns when known (either orientation), else None (found).
    """

    def __init__(self, grid: str | Sequence[int] | None = None) -> None:
        self.grid = parse_grid(grid) if not isinstance(grid, tuple) else grid

    def find(self, image: np.ndarray, path: str) -> tuple[ModuleGrid, list[np.ndarray]]:
        """The module's grid and its cells (rectified crops, row by row)."""
        grid = find_module_grid(image, self.grid, path)
        rect = grid.rectify(image if image.ndim == 3 else image[..., None])
        return grid, grid.cut(rect)

    def score(self, backend: Backend, builder: RecordBuilder, images: Sequence[np.ndarray], paths: Sequence[str],
              heat: bool = False) -> list[ModuleResult | str]:
        """Modules (H, W, C) uint8 → a :class:`ModuleResult` each, or an error message; the cells of all
        modules go through ``backend`` as one batch (split by the backend when it caps batches)."""
        found: list[tuple[ModuleGrid, list[np.ndarray]] | str] = []
        for image, path in zip(images, paths):
            try:
                found.append(self.find(image, path))
            except (ModuleGridError, ValueError, TypeError) as exc:
                found.append(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
        crops = [c for f in found if not isinstance(f, str) for c in f[1]]
        if not crops:
            return [f for f in found]  # every one an error
        outputs = backend(frames_to_batch(crops, backend.input_size))
        layout = OutputLayout.of(backend.output_specs, backend.metadata.get("box_class_names")) if heat else None
        results: list[ModuleResult | str] = []
        j = 0
        for f, image in zip(found, images):
            if isinstance(f, str):
                results.append(f)
                continue
            grid, cells = f
            record, j = self._record(builder, outputs, j, grid, cells)
            module_heat = None
            if layout is not None and layout.heatmap is not None:
                module_heat = self._heatmap(outputs[layout.heatmap][j - len(cells): j], grid, cells)
            results.append(ModuleResult(record, grid, module_heat))
        return results

    def records(self, backend: Backend, builder: RecordBuilder, images: Sequence[np.ndarray], paths: Sequence[str]) -> list[dict | str]:
        """:meth:`score` without heatmaps: one record (or error message) per module, for the station."""
        return [r if isinstance(r, str) else r.record for r in self.score(backend, builder, images, paths)]

    @staticmethod
    def _record(builder: RecordBuilder, outputs: dict[str, np.ndarray], j: int, grid: ModuleGrid,
                cells: list[np.ndarray]) -> tuple[dict, int]:
        quads = grid.cell_quads()
        boxes_at = grid.cell_boxes()
        entries, all_boxes = [], []
        for k, crop in enumerate(cells):
            r, c = divmod(k, grid.cols)
            rec = builder.record(outputs, j, crop.shape[:2])
            j += 1
            entry = {"row": r, "col": c, "quad": _round(quads[r, c])}
            entry |= {key: value for key, value in rec.items() if key != "boxes"}  # every field a single cell's record has
            if "boxes" in rec:
                x0, y0 = boxes_at[r, c, :2]
                mapped = []
                for b in rec["boxes"]:
                    x1, y1, x2, y2 = b["box"]
                    corners = grid.to_image(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64) + [x0 - 0.5, y0 - 0.5])
                    lo, hi = corners.min(0), corners.max(0)
                    mapped.append({"label": b["label"], "score": b["score"], "box": _round([*lo, *hi]), "quad": _round(corners)})
                entry["boxes"] = mapped
                all_boxes += [dict(b, row=r, col=c) for b in mapped]
            entries.append(entry)
        graded = [e for e in entries if e["grade"] is not None]
        worst = max(graded, key=lambda e: (e["grade"], e["confidence"] or 0.0)) if graded else None
        record: dict[str, Any] = {
            "decision": worst["decision"] if worst else None,
            "grade": worst["grade"] if worst else None,
            "confidence": worst["confidence"] if worst else None,
            "probabilities": worst["probabilities"] if worst else None,
            "grid": grid.to_dict(),
        }
        if graded:
            names = builder.class_names or sorted({str(e["decision"]) for e in graded})
            counts = {n: 0 for n in names}
            for e in graded:
                counts[str(e["decision"])] = counts.get(str(e["decision"]), 0) + 1
            record["grade_counts"] = counts
        record["cells"] = entries
        if "boxes" in builder.has:
            record["boxes"] = sorted(all_boxes, key=lambda b: -b["score"])
        return record, j

    @staticmethod
    def _heatmap(heats: np.ndarray, grid: ModuleGrid, cells: list[np.ndarray]) -> np.ndarray:
        """Per-cell heatmaps (N, [1,] h, w) in 0..1 → one (H, W) float32 map of the module image."""
        import cv2

        canvas = np.zeros(grid.size, np.float32)
        for (x0, y0, x1, y1), heat in zip(grid.cell_boxes().reshape(-1, 4), heats):
            h = np.asarray(heat, np.float32).reshape(np.asarray(heat).shape[-2:])
            canvas[y0:y1, x0:x1] = cv2.resize(np.clip(h, 0, 1), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        H, W = grid.image_size
        return cv2.warpPerspective(canvas, grid.inverse, (W, H), flags=cv2.INTER_LINEAR, borderValue=0.0)


def draw_module_overlay(image: np.ndarray, result: ModuleResult, class_names: Sequence[str] = ()) -> Image.Image:
    """The module with its heatmap blended into the cells that are not ok, each cell outlined (and tinted when not ok) in its grade's
    colour, the boxes drawn as quads with label and score, and a caption with the grade counts."""
    base = Image.fromarray(image if image.ndim == 2 else (image[..., 0] if image.shape[2] == 1 else image)).convert("RGB")
    if result.heat is not None:  # in the cells graded worse than the first grade only, so ok cells stay readable
        mask = Image.new("L", base.size, 0)
        md = ImageDraw.Draw(mask)
        for cell in result.record["cells"]:
            if cell.get("grade"):
                md.polygon([tuple(p) for p in cell["quad"]], fill=255)
        base = blend_heatmap(base, result.heat * (np.asarray(mask, np.float32) / 255.0), strength=0.6)
    w, h = base.size
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    td = ImageDraw.Draw(tint)
    lines = ImageDraw.Draw(base)
    width = max(2, min(w, h) // 300)
    for cell in result.record["cells"]:
        g = cell.get("grade")
        colour = _GRADE_COLOURS[min(g, len(_GRADE_COLOURS) - 1)] if g is not None else (255, 255, 255)
        poly = [tuple(p) for p in cell["quad"]]
        if g:
            td.polygon(poly, fill=(*colour, 70))
        lines.polygon(poly, outline=colour, width=width)
    base = Image.alpha_composite(base.convert("RGBA"), tint).convert("RGB")
    draw = ImageDraw.Draw(base)
    from lineside.runtime.detections import _font

    font = _font(max(12, min(w, h) // 40))
    for b in result.record.get("boxes", []):
        draw.polygon([tuple(p) for p in b["quad"]], outline=_BOX_COLOUR, width=width)
        x1, y1 = b["box"][:2]
        text = f"{b['label']} {b['score']:.2f}"
        tb = draw.textbbox((x1, max(0, y1 - 2 * width)), text, font=font)
        draw.rectangle(tb, fill=(0, 0, 0))
        draw.text((x1, max(0, y1 - 2 * width)), text, fill=_BOX_COLOUR, font=font)
    rec = result.record
    grid = rec["grid"]
    counts = rec.get("grade_counts") or {}
    text = f"{grid['rows']}x{grid['cols']} cells" + (": " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) if counts else "")
    if rec.get("decision") is not None:
        text += f"; module: {rec['decision']}"
    big = _font(max(14, min(w, h) // 25))
    tb = draw.textbbox((8, 8), text, font=big)
    draw.rectangle(tb, fill=(0, 0, 0))
    g = rec.get("grade")
    draw.text((8, 8), text, fill=_GRADE_COLOURS[min(g, 3)] if g is not None else (255, 255, 255), font=big)
    return base


def _columns(grading: bool, boxes: bool, heatmap: bool) -> list[str]:
    cols = ["path"] + (["grade", "grade_name", "confidence"] if grading else []) + ["rows", "cols"]
    cols += (["grades"] if grading else []) + ["cells"] + (["boxes"] if boxes else []) + (["heatmap"] if heatmap else [])
    return cols + ["error"]


def _row(path: str, result: ModuleResult, columns: list[str]) -> dict:
    rec = result.record
    row = {"path": path, "rows": rec["grid"]["rows"], "cols": rec["grid"]["cols"], "error": ""}
    if "grade" in columns:
        row |= {"grade": rec["grade"], "grade_name": rec["decision"], "confidence": f"{rec['confidence']:.6f}"}
        grades = np.full((rec["grid"]["rows"], rec["grid"]["cols"]), -1, dtype=int)
        for cell in rec["cells"]:
            grades[cell["row"], cell["col"]] = cell["grade"]
        row["grades"] = json.dumps(grades.tolist(), separators=(",", ":"))
    row["cells"] = json.dumps(rec["cells"], separators=(",", ":"))
    if "boxes" in columns:
        row["boxes"] = json.dumps(rec.get("boxes", []), separators=(",", ":"))
    return row


def _ahead(pool: ThreadPoolExecutor, fn, items: list, ahead: int):
    """``fn(item)`` for each item, in order, at most ``ahead`` running in advance (module images are large)."""
    from collections import deque

    window: deque = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) > ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def score_modules(
    runner: Backend,
    inputs: str | Iterable[str],
    output: str | os.PathLike,
    overlays: str | os.PathLike | None = None,
    heatmaps: str | os.PathLike | None = None,
    grid: str | Sequence[int] | None = None,
    box_threshold: float = BOX_SCORE_THRESHOLD,
    retry_errors: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
) -> ScoreSummary:
    """``lineside score --tile cells``: one row per module image (resumable, as :func:`runtime.score.score`).

    Columns: ``path``, ``grade`` / ``grade_name`` / ``confidence`` (the worst cell, grading models),
    ``rows``, ``cols``, ``grades`` (JSON rows x cols of cell grades), ``cells`` (JSON, the per-cell list of
    the record), ``boxes`` (JSON, models with boxes, image px), ``heatmap`` (with ``heatmaps``: the
    module's heatmap PNG at the image's size), ``error``. ``overlays``: one PNG per module
    (:func:`draw_module_overlay`)."""
    from tqdm import tqdm

    output = Path(output)
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"{output}: output must end in .csv or .parquet")
    if not runner.takes_image:
        raise InputError(f"{runner.describe()} takes point clouds; --tile cells cuts module images into cells for an image model")
    tiler = ModuleTiler(grid)
    builder = RecordBuilder(runner, box_threshold)
    layout = OutputLayout.of(runner.output_specs, runner.metadata.get("box_class_names"))
    if heatmaps and layout.heatmap is None:
        raise InputError(f"{runner.describe()} gives no heatmap (outputs {runner.output_names}); drop --heatmaps")
    grading = "grade" in builder.has
    columns = _columns(grading, "boxes" in builder.has, bool(heatmaps))
    paths = collect_inputs(inputs) if isinstance(inputs, str) else list(inputs)
    root = inputs if isinstance(inputs, str) and os.path.isdir(inputs) else ""
    if root:  # outputs written inside the input folder are not inputs of a later run
        folders = [os.path.abspath(d) + os.sep for d in (overlays, heatmaps) if d]
        files = {os.path.abspath(output), os.path.abspath(str(output) + ".partial.csv")}
        paths = [p for p in paths if os.path.abspath(p) not in files and not any(os.path.abspath(p).startswith(f) for f in folders)]
    writer, previous, done = open_journal(output, columns, retry_errors)
    todo = [p for p in paths if p not in done]
    overlay_dir = Path(overlays) if overlays else None
    heatmap_dir = Path(heatmaps) if heatmaps else None
    want_heat = layout.heatmap is not None and (overlay_dir is not None or heatmap_dir is not None)
    channels = runner.channels

    def load(path: str) -> tuple[np.ndarray | None, str]:
        try:
            return read_image(path, channels), ""
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
            return None, str(exc) if str(exc).startswith(path) else f"{path}: {exc}"

    scored = errors = 0
    start = time.perf_counter()
    workers = max(1, min(2, num_workers if num_workers is not None else 2))
    bar = tqdm(total=len(todo), unit="module", desc=f"scoring modules ({runner.name})", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="module-decode")
    drawer = ThreadPoolExecutor(max_workers=1) if overlay_dir is not None else None
    pending = []
    try:
        for path, (image, error) in zip(todo, _ahead(pool, load, todo, 2)):
            result = tiler.score(runner, builder, [image], [path], heat=want_heat)[0] if image is not None else error
            if isinstance(result, str):
                writer.append([{c: "" for c in columns} | {"path": path, "error": result}])
                errors += 1
            else:
                row = _row(path, result, columns)
                if heatmap_dir is not None and result.heat is not None:
                    target = _target(path, heatmap_dir, root)
                    _save_png(heatmap_to_image(result.heat, (image.shape[1], image.shape[0])), target)
                    row["heatmap"] = str(target)
                writer.append([row])
                scored += 1
                if drawer is not None:
                    pending.append(drawer.submit(lambda im=image, res=result, p=path: _save_png(
                        draw_module_overlay(im, res, builder.box_class_names), _target(p, overlay_dir, root))))
            bar.update(1)
            bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
        pool.shutdown()
        if drawer is not None:
            for f in pending:
                if f.exception() is not None:
                    import logging

                    logging.getLogger("lineside.score").warning("overlay failed: %s", f.exception())
            drawer.shutdown()
    if output.suffix.lower() == ".parquet":
        finalise_parquet(writer, output, previous, {"grade": int, "confidence": float, "rows": int, "cols": int})
    return ScoreSummary(len(paths), len(paths) - len(todo), scored, errors, time.perf_counter() - start, str(output), runner.describe())
