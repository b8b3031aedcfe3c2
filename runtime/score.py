"""Batch offline scoring of a folder, glob or CSV manifest with a trained lineside model, through any backend.

    lineside score --model runs/el_grading/checkpoints/best.ckpt --input /data/cells --output results.csv
    lineside score --model best.ckpt --input "lines/*/cam0/*.png" --output results.parquet --overlays overlays/
    lineside score --model export/quickstart/model.onnx --input /data/cells --output results.csv
    lineside score --model export/grasp/model.onnx --input scans/ --output grasps.csv --overlays ov/   # point clouds → grasps

A model that takes point clouds (``.ply``/``.pcd``/``.xyz``/``.npy``, or depth images with intrinsics)
scores them with :mod:`export.point_score`: one row per file with a ``grasps`` JSON column.

``--model`` takes a checkpoint or any exported artefact (``.onnx``, ``.pt2``, ``.engine``, an
export folder). Files are decoded to uint8 outside the model and everything after runs inside
it (:class:`export.deployable.DeployableModel`), so a file gets the same grade through every
backend. With a checkpoint, ``--backend auto`` (the default) exports it once to ONNX (cached,
parity-checked on real images) and scores with ONNX Runtime, the fastest CPU backend; on a GPU
it runs eager torch. ``--backend torch`` keeps eager PyTorch.

One row per input: path, grade, grade_name, confidence, p_<grade> per grade (grading models),
grade_<q>, grade_name_<q>, confidence_<q>, p_<q>_<grade> for each named grading task ``grading/<q>``
(a plant model's ``grading/el``: ``grade_el``, ``p_el_ok`` …; grade indices for an artefact exported
before its metadata recorded the names, ``grade_class_names``),
``boxes`` (models with a localization or segmentation head), ``heatmap`` (with ``--heatmaps``), ``mask``
(with ``--masks``), error. ``boxes`` is a
JSON list ``[{"label": name, "score": s, "box": [x1, y1, x2, y2]}, …]`` in pixels of the original
file, best first, the boxes scoring at least ``--box-threshold`` (default 0.3); a localization-only
model writes no grade columns (path, boxes, error). ``--heatmaps DIR`` saves each image's defect
heatmap as an 8-bit PNG of the image's size (0..255 = 0..1; the localization head's
``defect_heatmap``, else the grading head's ``grade_heatmap``, see :mod:`fusion.grade_heatmap`)
and the ``heatmap`` column holds its path. A segmentation model (output ``defect_masks``) adds one box per
connected region of a defect class to ``boxes`` (:class:`runtime.records.SegmentationField`;
busbars, a structure class, are left out); ``--masks DIR`` saves each image's class index per pixel
(0 background, nearest neighbour from the stride-4 map) as an 8-bit PNG of the image's size, with
``DIR/classes.json`` (index → class name), and the ``mask`` column holds its path; its overlays paint
the defect classes in colour (cracks red) instead of blending the heatmap. Overlays (``--overlays``)
blend that heatmap over the
image, draw the boxes with label and score, and frame the image in the grade's colour. Rows are
appended (and fsync'ed) as each batch finishes, so a crash loses nothing already scored; running
the same command again resumes and skips finished rows. A corrupt, empty or unsupported file gets
a row with its error and the run goes on. Parquet output is assembled atomically at the end from a
``<output>.partial.csv`` journal.

A CSV manifest with a ``label`` column (class name or index) is also an evaluation set: after
scoring, accuracy, macro-F1, per-grade recall, the confusion matrix and AUROC ok-vs-defective
are printed and written to ``<output>.metrics.json`` (rows with errors or without label are left out).

    lineside elpv manifest --split test --out elpv_test.csv
    lineside score --model runs/el_grading_cv/ensemble.ckpt --input elpv_test.csv --output test_scores.csv
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections import deque
from typing import Iterable, Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lineside.runtime.backend import Backend  # noqa: E402
from lineside.export.checkpoint import LoadedModel  # noqa: E402
from lineside.runtime.detections import BOX_SCORE_THRESHOLD, OutputLayout, blend_heatmap, draw_boxes  # noqa: E402
from lineside.runtime.detections import MaskLayout, class_index_map, colour_classes, heatmap_to_image  # noqa: E402
from lineside.fusion.ensemble import grade_metrics  # noqa: E402
from lineside.vision.image_dataset import ScoringImageDataset  # noqa: E402
from lineside.vision.io import InputError, collect_inputs, read_image  # noqa: E402
from lineside.vision.records import DatasetFormatError, records_from_manifest  # noqa: E402
from lineside.runtime.results import ScoreSummary, finalise_parquet, open_journal  # noqa: E402
from lineside.runtime.open_model import open_model  # noqa: E402
from lineside.runtime.records import RecordBuilder, score_row  # noqa: E402

__all__ = ["ScoreSummary", "collect_inputs", "evaluate_scores", "manifest_labels", "open_model", "score"]

log = logging.getLogger("lineside.score")

_MIN_OVERLAY_SIDE = 256  # px: smaller images are enlarged for their overlays

# severity colours for overlays: ok → severe
_COLOURS = [(40, 180, 60), (230, 200, 30), (240, 130, 20), (220, 30, 30)]


def _target(path: str, out_dir: Path, root: str) -> Path:
    """``out_dir``/<path relative to the input folder>.png (the file name alone outside it)."""
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    target = out_dir / (rel if not rel.startswith("..") else os.path.basename(path))
    return target.with_suffix(".png")


def _save_png(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, target)


def _draw_overlay(path: str, out_dir: Path, grade_name: str | None, grade: int | None, confidence: float | None, root: str,
                  boxes: list[dict] | None = None, heat: np.ndarray | None = None, box_class_names: list[str] | None = None,
                  classes: tuple[np.ndarray, MaskLayout] | None = None) -> None:
    """The image with the heatmap blended over it (a segmentation model: its defect classes painted in
    their colours instead, ``classes`` = (class index map, layout)), the boxes drawn, framed and
    captioned in the grade's colour.

    Images under ``_MIN_OVERLAY_SIDE`` px (radiograph patches of 32 px) are enlarged by a whole
    factor (nearest neighbour) first, so the caption and the boxes leave the image readable."""
    image = Image.fromarray(read_image(path, 3))
    factor = -(-_MIN_OVERLAY_SIDE // max(1, min(image.size)))
    if factor > 1:
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
        boxes = [dict(b, box=[v * factor for v in b["box"]]) for b in boxes or []]
    if classes is not None:
        image = colour_classes(image, *classes)
    elif heat is not None:
        image = blend_heatmap(image, heat)
    if boxes:
        draw_boxes(image, boxes, box_class_names or [])
    w, h = image.size
    draw = ImageDraw.Draw(image)
    colour = _COLOURS[min(grade, len(_COLOURS) - 1)] if grade is not None else (255, 255, 255)
    border = max(2, min(w, h) // 60)
    if grade is not None:
        draw.rectangle([0, 0, w - 1, h - 1], outline=colour, width=border)
    size = max(12, min(w, h) // 12)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow
        font = ImageFont.load_default()
    text = f"{grade_name} {confidence:.0%}" if grade is not None else f"{len(boxes or [])} defect{'' if len(boxes or []) == 1 else 's'}"
    at = (border + 2, border + 2)
    if grade is None:  # boxes-only: the caption goes to the bottom, clear of the box labels along the top
        at = (border + 2, h - border - 2 - draw.textbbox((0, 0), text, font=font)[3])
    box = draw.textbbox(at, text, font=font)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text(at, text, fill=colour, font=font)
    _save_png(image, _target(path, out_dir, root))


def _columns(class_names: list[str], grades: bool = True, boxes: bool = False, heatmap: bool = False, mask: bool = False,
             named: dict[str, list[str]] | None = None) -> list[str]:
    """Result columns: path, the grade columns (grading models), those of each named grading task
    (``named``: ``{q: grade names}``, :attr:`RecordBuilder.named_grades <lineside.runtime.records.RecordBuilder.named_grades>`:
    ``grade_<q>``, ``grade_name_<q>``, ``confidence_<q>``, ``p_<q>_<name>``), boxes, heatmap, mask, error."""
    cols = ["path"]
    if grades:
        cols += ["grade", "grade_name", "confidence", *[f"p_{n}" for n in class_names]]
    for q, names in (named or {}).items():
        cols += [f"grade_{q}", f"grade_name_{q}", f"confidence_{q}", *[f"p_{q}_{n}" for n in names]]
    return cols + (["boxes"] if boxes else []) + (["heatmap"] if heatmap else []) + (["mask"] if mask else []) + ["error"]


def _write_classes(mask_dir: Path, layout: MaskLayout) -> None:
    """``mask_dir/classes.json``: class index (as text) → class name, ``"0": "background"``."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    target = mask_dir / "classes.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({str(k): n for k, n in layout.index_names.items()}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def _prefetched_batches(dataset: ScoringImageDataset, batch_size: int, threads: int, ahead: int = 4) -> Iterator[dict]:
    """Batches ``{"image": (B, C, H, W) uint8 ndarray, "path": [...], "error": [...]}`` decoded by
    ``threads`` threads, at most ``ahead`` batches in advance.

    Threads, not worker processes: image decoding and every backend release the GIL, and
    handing arrays between processes cost more than it saved (ONNX Runtime on 2 cores: 318 img/s
    with one worker process, 392 with one decoding thread).
    """

    def load(start: int) -> dict:
        items = [dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]
        return {"image": np.stack([it["image"].numpy() for it in items]), "path": [it["path"] for it in items],
                "error": [it["error"] for it in items], "size": [it["size"] for it in items]}

    if threads <= 0:
        for start in range(0, len(dataset), batch_size):
            yield load(start)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        window: deque = deque()
        for start in range(0, len(dataset), batch_size):
            window.append(pool.submit(load, start))
            if len(window) > ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def score(
    model: str | os.PathLike | LoadedModel | Backend,
    inputs: str | Iterable[str],
    output: str | os.PathLike,
    overlays: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    num_workers: int | None = None,
    tta_views: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    backend: str = "auto",
    input_size: str | tuple[int, int] | None = None,
    box_threshold: float = BOX_SCORE_THRESHOLD,
    heatmaps: str | os.PathLike | None = None,
    intrinsics: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
    masks: str | os.PathLike | None = None,
    tile: str | None = None,
    grid: str | None = None,
) -> ScoreSummary:
    """Score inputs with a model (checkpoint, artefact or backend) and write/resume ``output`` (.csv or .parquet).

    ``trust_checkpoint``: a checkpoint that a weights-only load refuses is loaded as a full pickle (see :func:`open_model`).

    ``box_threshold``: boxes scoring below it stay out of the ``boxes`` column and the overlays.
    ``heatmaps``: a folder for one heatmap PNG per image (column ``heatmap``).
    ``masks``: segmentation models: a folder for one class-index PNG per image (column ``mask``) and
    ``classes.json``. See the module docstring.
    ``tile="cells"``: inputs are whole-module images, one row per module (:mod:`lineside.runtime.module_score`);
    ``grid``: ``"6x10"`` rows x columns when known (default: found in each image).
    """
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"{output}: output must end in .csv or .parquet")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    runner = open_model(model, backend, device, input_size, tta_views, trust_checkpoint=trust_checkpoint)
    if runner.takes_points:  # point clouds / depth images → grasps: export/point_score.py
        from lineside.runtime.point_score import score_points

        return score_points(runner, inputs, output, overlays, batch_size, num_workers, retry_errors, progress, intrinsics)
    if tile:  # whole-module images: one row per module, its cells scored as one batch (runtime/module_score.py)
        from lineside.runtime.module_score import TILE_CHOICES, score_modules

        if tile not in TILE_CHOICES:
            raise InputError(f"--tile {tile!r}: choose one of {list(TILE_CHOICES)}")
        if masks:
            raise InputError("--masks writes one mask per cell image; it does not combine with --tile cells")
        return score_modules(runner, inputs, output, overlays, heatmaps, grid, box_threshold, retry_errors, progress, num_workers)
    class_names = runner.class_names
    layout = OutputLayout.of(runner.output_specs, runner.metadata.get("box_class_names"))
    records = RecordBuilder(runner, box_threshold)
    grading = "grade" in records.has
    mask_layout = records.mask_layout
    if masks and mask_layout is None:
        raise InputError(f"{runner.describe()} gives no defect_masks (outputs {runner.output_names}); --masks needs a model "
                         "with a segmentation head: drop --masks or score a segmentation model")
    if heatmaps and layout.heatmap is None:
        raise InputError(f"{runner.describe()} gives no heatmap (outputs {runner.output_names}); drop --heatmaps "
                         "or re-export the checkpoint (grading models on images give grade_heatmap)")
    paths = collect_inputs(inputs) if isinstance(inputs, str) else list(inputs)
    root = inputs if isinstance(inputs, str) and os.path.isdir(inputs) else ""
    if root:  # results, overlays and heatmaps written inside the input folder are not inputs of a later run
        folders = [os.path.abspath(d) + os.sep for d in (overlays, heatmaps, masks) if d]
        files = {os.path.abspath(output), os.path.abspath(str(output) + ".partial.csv"), os.path.abspath(str(output) + ".metrics.json")}
        paths = [p for p in paths if os.path.abspath(p) not in files and not any(os.path.abspath(p).startswith(f) for f in folders)]
    columns = _columns(class_names, grading, "boxes" in records.has, bool(heatmaps), bool(masks), records.named_grades)
    heatmap_dir = Path(heatmaps) if heatmaps else None
    mask_dir = Path(masks) if masks else None
    if mask_dir is not None:
        _write_classes(mask_dir, mask_layout)
    box_names = list(layout.box_class_names) + (list(mask_layout.class_names) if mask_layout else [])

    parquet = output.suffix.lower() == ".parquet"
    writer, previous, done = open_journal(output, columns, retry_errors)
    todo = [p for p in paths if p not in done]

    overlay_dir = Path(overlays) if overlays else None
    if num_workers is None:
        num_workers = min(4, max(1, os.cpu_count() or 2))
    loader = _prefetched_batches(ScoringImageDataset(todo, runner.input_size, runner.channels), batch_size, num_workers)
    scored = errors = 0
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=2) if overlay_dir else None
    pending = []
    bar = tqdm(total=len(todo), unit="img", desc=f"scoring ({runner.name})", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            ok = np.array([not e for e in batch["error"]])
            rows: list[dict] = []
            out: dict[str, np.ndarray] = {}
            where = np.cumsum(ok) - 1  # batch row → row of the model's outputs
            if ok.any():
                out = runner(batch["image"][ok])
            for i, path in enumerate(batch["path"]):
                if batch["error"][i]:
                    rows.append({c: "" for c in columns} | {"path": path, "error": batch["error"][i]})
                    errors += 1
                    continue
                j = int(where[i])
                record = records.record(out, j, batch["size"][i])
                row = {"path": path, "error": ""} | score_row(record, class_names)
                g, boxes = record["grade"], record.get("boxes")
                heat = out[layout.heatmap][j] if layout.heatmap else None
                if heatmap_dir is not None:
                    target = _target(path, heatmap_dir, root)
                    h0, w0 = batch["size"][i]
                    _save_png(heatmap_to_image(heat, (w0, h0)), target)
                    row["heatmap"] = str(target)
                index_map = None
                if mask_layout is not None and (mask_dir is not None or pool is not None):
                    index_map = class_index_map(out[mask_layout.name][j], mask_layout, batch["size"][i])
                if mask_dir is not None:
                    target = _target(path, mask_dir, root)
                    _save_png(Image.fromarray(index_map), target)
                    row["mask"] = str(target)
                rows.append(row)
                scored += 1
                if pool is not None:
                    pending.append(pool.submit(_draw_overlay, path, overlay_dir, record["decision"], g, record["confidence"], root, boxes,
                                               heat, box_names, (index_map, mask_layout) if index_map is not None else None))
            writer.append(rows)
            bar.update(len(rows))
            bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
        if pool is not None:
            for f in pending:
                if f.exception() is not None:
                    log.warning("overlay failed: %s", f.exception())
            pool.shutdown()
    if parquet:
        finalise_parquet(writer, output, previous)
    return ScoreSummary(len(paths), len(paths) - len(todo), scored, errors, time.perf_counter() - start, str(output), runner.describe())


def manifest_labels(manifest: Path, class_names: list[str]) -> dict[str, int] | None:
    """path → grade index from a CSV manifest's ``label`` column; None without labels."""
    try:
        records, _ = records_from_manifest(manifest, class_names)
    except DatasetFormatError as exc:
        raise InputError(str(exc)) from exc
    labels = {r.path: r.label for r in records if r.label >= 0}
    return labels or None


def evaluate_scores(output: str | os.PathLike, manifest: str | os.PathLike, class_names: list[str]) -> dict | None:
    """Metrics of a finished scoring ``output`` against a labelled CSV ``manifest`` (None if unlabelled).

    Writes them to ``<output>.metrics.json`` and returns them.
    """
    output = Path(output)
    labels = manifest_labels(Path(manifest), class_names)
    if labels is None:
        return None
    if output.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
    else:
        with open(output, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    rows = [r for r in rows if not r.get("error") and r["path"] in labels]
    if not rows:
        return None
    probs = np.array([[float(r[f"p_{n}"]) for n in class_names] for r in rows])
    metrics = grade_metrics(probs, np.array([labels[r["path"]] for r in rows])) | {"class_names": class_names}
    metrics["missing_or_failed"] = len(labels) - len(rows)
    with open(output.with_name(output.name + ".metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    return metrics

