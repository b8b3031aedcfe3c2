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
``boxes`` (models with a localization head), ``heatmap`` (with ``--heatmaps``), error. ``boxes`` is a
JSON list ``[{"label": name, "score": s, "box": [x1, y1, x2, y2]}, …]`` in pixels of the original
file, best first, the boxes scoring at least ``--box-threshold`` (default 0.3); a localization-only
model writes no grade columns (path, boxes, error). ``--heatmaps DIR`` saves each image's defect
heatmap as an 8-bit PNG of the image's size (0..255 = 0..1; the localization head's
``defect_heatmap``, else the grading head's ``grade_heatmap``, see :mod:`fusion.grade_heatmap`)
and the ``heatmap`` column holds its path. Overlays (``--overlays``) blend that heatmap over the
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

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections import deque
from typing import Iterable, Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lineside.export.backends import Backend, BackendError, TorchBackend, load_backend  # noqa: E402
from lineside.export.checkpoint import LoadedModel, load_inspection_model  # noqa: E402
from lineside.export.deployable import build_deployable, parse_size  # noqa: E402
from lineside.export.detections import BOX_SCORE_THRESHOLD, OutputLayout, blend_heatmap, box_records, draw_boxes  # noqa: E402
from lineside.export.detections import heatmap_to_image  # noqa: E402
from lineside.fusion.ensemble import format_confusion, grade_metrics  # noqa: E402
from lineside.vision.image_dataset import ScoringImageDataset  # noqa: E402
from lineside.vision.io import InputError, collect_inputs, read_image  # noqa: E402
from lineside.vision.records import DatasetFormatError, records_from_manifest  # noqa: E402

__all__ = ["ScoreSummary", "collect_inputs", "evaluate_scores", "open_model", "score", "main"]

log = logging.getLogger("lineside.score")

_MIN_OVERLAY_SIDE = 256  # px: smaller images are enlarged for their overlays

# severity colours for overlays: ok → severe
_COLOURS = [(40, 180, 60), (230, 200, 30), (240, 130, 20), (220, 30, 30)]


class _RowWriter:
    """Appends CSV rows durably; reads back finished rows for resuming."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns

    def read_rows(self) -> list[dict]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        with open(self.path, "rb+") as fh:  # drop a torn last line left by a crash
            data = fh.read()
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                fh.truncate(cut)
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != self.columns:
                raise InputError(
                    f"{self.path}: existing results have columns {reader.fieldnames}, this model writes {self.columns}; "
                    "use another --output"
                )
            return list(reader)

    def rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, self.columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, rows: list[dict]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns)
        if new:
            w.writeheader()
        w.writerows(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


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
                  boxes: list[dict] | None = None, heat: np.ndarray | None = None, box_class_names: list[str] | None = None) -> None:
    """The image with the heatmap blended over it, the boxes drawn, framed and captioned in the grade's colour.

    Images under ``_MIN_OVERLAY_SIDE`` px (radiograph patches of 32 px) are enlarged by a whole
    factor (nearest neighbour) first, so the caption and the boxes leave the image readable."""
    image = Image.fromarray(read_image(path, 3))
    factor = -(-_MIN_OVERLAY_SIDE // max(1, min(image.size)))
    if factor > 1:
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
        boxes = [dict(b, box=[v * factor for v in b["box"]]) for b in boxes or []]
    if heat is not None:
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


@dataclass
class ScoreSummary:
    """What a scoring run did."""

    total: int
    skipped: int
    scored: int
    errors: int
    seconds: float
    output: str
    backend: str = ""

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else float("nan")


def _columns(class_names: list[str], grades: bool = True, boxes: bool = False, heatmap: bool = False) -> list[str]:
    """Result columns: path, the grade columns (grading models), boxes, heatmap, error."""
    cols = ["path"]
    if grades:
        cols += ["grade", "grade_name", "confidence", *[f"p_{n}" for n in class_names]]
    return cols + (["boxes"] if boxes else []) + (["heatmap"] if heatmap else []) + ["error"]


def open_journal(
    output: Path, columns: list[str], retry_errors: bool, project: bool = False
) -> tuple[_RowWriter, list[dict], set[str]]:
    """The results journal of a (resumable) scoring run: ``(writer, previous, done)``.

    CSV outputs are the journal itself; a Parquet output is journalled to ``<output>.partial.csv``
    and its earlier rows (``previous``) are read back so the final file keeps them. ``done`` holds
    the paths already scored; with ``retry_errors`` rows with an error are dropped (from the journal
    and ``previous``) so their inputs run again. ``project`` keeps only ``columns`` of earlier
    Parquet rows.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    parquet = output.suffix.lower() == ".parquet"
    writer = _RowWriter(output.with_name(output.name + ".partial.csv") if parquet else output, columns)
    previous: list[dict] = []
    if parquet and output.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
        previous = ([{c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows] if project
                    else [{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    done_rows = previous + writer.read_rows()
    if retry_errors:
        kept = [r for r in done_rows if not r.get("error")]
        if len(kept) != len(done_rows):
            previous = [r for r in previous if not r.get("error")]
            writer.rewrite([r for r in writer.read_rows() if not r.get("error")])
            done_rows = kept
    return writer, previous, {r["path"] for r in done_rows}


def _finalise_parquet(journal: _RowWriter, output: Path, previous: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = previous + journal.read_rows()
    columns = journal.columns
    table = {c: [r.get(c, "") for r in rows] for c in columns}
    for c in columns:
        if c == "grade":
            table[c] = [int(v) if v not in ("", None) else None for v in table[c]]
        elif c == "confidence" or c.startswith("p_"):
            table[c] = [float(v) if v not in ("", None) else None for v in table[c]]
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(pa.table(table), tmp)
    os.replace(tmp, output)
    journal.path.unlink(missing_ok=True)


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


def _cache_dir() -> Path:
    return Path(os.environ.get("LINESIDE_CACHE") or Path.home() / ".cache" / "lineside")


def _cached_onnx(loaded: LoadedModel, input_size: tuple[int, int] | None, tta_views: int | None, text: str | None = None) -> Path:
    """The checkpoint exported once to ONNX (parity-checked on real images), cached by checkpoint hash."""
    from lineside.export.metadata import file_sha256
    from lineside.export.onnx_export import export_onnx

    size = input_size or (loaded.image_size, loaded.image_size)
    views = loaded.tta_views if tta_views is None else tta_views
    # -o2: exports since the outputs gained grade_heatmap and box kinds (older cached graphs lack them)
    key = f"{file_sha256(loaded.source)[:16]}-{size[0]}x{size[1]}-tta{views}-o2"
    if text and getattr(loaded.model, "text_encoder", None) is not None:
        import hashlib

        key += "-text" + hashlib.sha256(text.encode()).hexdigest()[:8]
    folder = _cache_dir() / "onnx" / key
    path = folder / "model.onnx"
    if path.is_file() and (folder / "metadata.json").is_file():
        return path
    log.info("exporting %s to ONNX once (cached in %s) ...", loaded.source, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    result = export_onnx(loaded, tmp, size, tta_views=views, parity_images=16, text_prompt=text)
    if not result.ok:
        raise BackendError(f"ONNX export of {loaded.source} failed its parity check:\n{result.parity.table()}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return path


def open_model(
    model: str | os.PathLike | LoadedModel | Backend,
    backend: str = "auto",
    device: str = "cpu",
    input_size: str | tuple[int, int] | None = None,
    tta_views: int | None = None,
    text: str | None = None,
) -> Backend:
    """A :class:`export.backends.Backend` for a checkpoint, a loaded model or an exported artefact.

    ``backend="auto"``: a checkpoint on the CPU runs as a cached ONNX export in ONNX Runtime
    (falling back to eager torch, with a warning, when the export is impossible here); on a
    GPU, eager torch; an exported artefact runs on the backend its suffix names.
    """
    if isinstance(model, Backend):
        return model
    size = parse_size(input_size) if isinstance(input_size, (str, int)) else input_size
    is_ckpt = isinstance(model, LoadedModel) or str(model).lower().endswith((".ckpt", ".pt"))
    if not is_ckpt:
        if input_size or tta_views or text:
            raise InputError(f"{model}: --input-size, --tta and --text are fixed in an exported artefact; re-export to change them")
        return load_backend(model, None if backend == "auto" else backend, device)
    loaded = model if isinstance(model, LoadedModel) else load_inspection_model(model)
    if backend == "auto" and device == "cpu" and loaded.source:
        try:
            return load_backend(_cached_onnx(loaded, size, tta_views, text), "onnxruntime", device)
        except Exception as exc:  # noqa: BLE001 - any export trouble: the eager model still scores correctly
            log.warning("ONNX Runtime path unavailable (%s); scoring with eager torch", str(exc).splitlines()[0])
    if backend not in ("auto", "torch"):
        raise InputError(f"backend {backend!r} takes an exported artefact; export the checkpoint first (lineside export ...)")
    return TorchBackend(deployable=build_deployable(loaded, size, tta_views, text), loaded=loaded, device=device)


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
) -> ScoreSummary:
    """Score inputs with a model (checkpoint, artefact or backend) and write/resume ``output`` (.csv or .parquet).

    ``box_threshold``: boxes scoring below it stay out of the ``boxes`` column and the overlays.
    ``heatmaps``: a folder for one heatmap PNG per image (column ``heatmap``). See the module docstring.
    """
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"{output}: output must end in .csv or .parquet")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    runner = open_model(model, backend, device, input_size, tta_views)
    if runner.takes_points:  # point clouds / depth images → grasps: export/point_score.py
        from lineside.export.point_score import score_points

        return score_points(runner, inputs, output, overlays, batch_size, num_workers, retry_errors, progress, intrinsics)
    class_names = runner.class_names
    layout = OutputLayout.of(runner.output_specs, runner.metadata.get("box_class_names"))
    grading = "grade_probs" in runner.output_names
    if heatmaps and layout.heatmap is None:
        raise InputError(f"{runner.describe()} gives no heatmap (outputs {runner.output_names}); drop --heatmaps "
                         "or re-export the checkpoint (grading models on images give grade_heatmap)")
    paths = collect_inputs(inputs) if isinstance(inputs, str) else list(inputs)
    root = inputs if isinstance(inputs, str) and os.path.isdir(inputs) else ""
    if root:  # results, overlays and heatmaps written inside the input folder are not inputs of a later run
        folders = [os.path.abspath(d) + os.sep for d in (overlays, heatmaps) if d]
        files = {os.path.abspath(output), os.path.abspath(str(output) + ".partial.csv"), os.path.abspath(str(output) + ".metrics.json")}
        paths = [p for p in paths if os.path.abspath(p) not in files and not any(os.path.abspath(p).startswith(f) for f in folders)]
    columns = _columns(class_names, grading, layout.has_boxes, bool(heatmaps))
    heatmap_dir = Path(heatmaps) if heatmaps else None

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
            probs = np.zeros((len(ok), len(class_names)), dtype=np.float64)
            grades = np.zeros(len(ok), dtype=np.int64)
            out: dict[str, np.ndarray] = {}
            where = np.cumsum(ok) - 1  # batch row → row of the model's outputs
            if ok.any():
                out = runner(batch["image"][ok])
                if grading:
                    probs[ok] = out["grade_probs"]
                    grades[ok] = out["grade"]
            for i, path in enumerate(batch["path"]):
                if batch["error"][i]:
                    rows.append({c: "" for c in columns} | {"path": path, "error": batch["error"][i]})
                    errors += 1
                    continue
                row = {"path": path, "error": ""}
                g = int(grades[i]) if grading else None
                if grading:
                    row |= {"grade": g, "grade_name": class_names[g], "confidence": f"{probs[i, g]:.6f}"}
                    row |= {f"p_{n}": f"{p:.6f}" for n, p in zip(class_names, probs[i])}
                j = int(where[i])
                boxes = None
                if layout.has_boxes:
                    boxes = box_records(out[layout.boxes][j], out[layout.scores][j], out[layout.labels][j], layout.box_class_names,
                                        runner.input_size, batch["size"][i], box_threshold)
                    row["boxes"] = json.dumps(boxes, separators=(",", ":"))
                heat = out[layout.heatmap][j] if layout.heatmap else None
                if heatmap_dir is not None:
                    target = _target(path, heatmap_dir, root)
                    h0, w0 = batch["size"][i]
                    _save_png(heatmap_to_image(heat, (w0, h0)), target)
                    row["heatmap"] = str(target)
                rows.append(row)
                scored += 1
                if pool is not None:
                    pending.append(pool.submit(_draw_overlay, path, overlay_dir, class_names[g] if grading else None, g,
                                               float(probs[i, g]) if grading else None, root, boxes, heat, list(layout.box_class_names)))
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
        _finalise_parquet(writer, output, previous)
    return ScoreSummary(len(paths), len(paths) - len(todo), scored, errors, time.perf_counter() - start, str(output), runner.describe())


def _manifest_labels(manifest: Path, class_names: list[str]) -> dict[str, int] | None:
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
    labels = _manifest_labels(Path(manifest), class_names)
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


def _print_metrics(m: dict) -> None:
    names = m["class_names"]
    print(f"labelled {m['n']}: acc {100 * m['acc']:.1f}%  macro-F1 {m['macro_f1']:.3f}  AUROC ok-vs-defective {m['auroc_defective']:.3f}")
    print("recall: " + "  ".join(f"{n} {100 * r:.1f}%" for n, r in zip(names, m["recall"])))
    print(format_confusion(names, m["confusion"]))
    if m["missing_or_failed"]:
        print(f"({m['missing_or_failed']} labelled inputs failed or were not scored and are left out)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside score", description="Score images with a lineside model; resumable, one row per input.")
    ap.add_argument("--model", "--ckpt", dest="model", required=True,
                    help="checkpoint (lineside fit / crossval's ensemble.ckpt) or exported artefact (.onnx, .pt2, .engine, export folder)")
    ap.add_argument("--input", required=True, help="folder (recursive), glob (quote it) or CSV manifest with a 'path' column (and 'label' to evaluate)")
    ap.add_argument("--output", required=True, help="results .csv or .parquet (resumed if it exists)")
    ap.add_argument("--overlays", default=None, help="folder for PNG overlays (image with the heatmap blended in, boxes, grade and confidence)")
    ap.add_argument("--box-threshold", type=float, default=BOX_SCORE_THRESHOLD,
                    help=f"models with a localization head: boxes scoring at least this go to the boxes column and overlays (default {BOX_SCORE_THRESHOLD})")
    ap.add_argument("--heatmaps", default=None, help="folder for one defect-heatmap PNG per image (image size, 0..255 = 0..1); "
                    "adds a heatmap column with its path")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--num-workers", type=int, default=None, help="decoding threads (default: cores, at most 4; 0 = decode in the main thread)")
    ap.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8], help="dihedral test-time views (checkpoints; default: as trained)")
    ap.add_argument("--backend", default="auto", help="auto (default: a checkpoint runs as a cached ONNX export in ONNX Runtime on the CPU), "
                    "torch, onnxruntime, aoti, tensorrt")
    ap.add_argument("--input-size", default=None, help="checkpoints: HxW of the frames the model takes (default: the training size)")
    ap.add_argument("--text", default=None, help="checkpoints with a text encoder: one prompt for every image (cell type, product …)")
    ap.add_argument("--intrinsics", default=None, help="point models: pinhole intrinsics JSON for depth-image inputs "
                    "(default: <stem>.json or intrinsics.json beside each image)")
    ap.add_argument("--retry-errors", action="store_true", help="on resume, score again the rows that had errors")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim"):  # a checkpoint's one-off ONNX export: its summary only
        logging.getLogger(noisy).setLevel(logging.WARNING)
    labelled = os.path.isfile(a.input) and a.input.lower().endswith(".csv")
    try:
        runner = open_model(a.model, a.backend, a.device, a.input_size, a.tta, a.text)
        labelled = labelled and "grade_probs" in runner.output_names  # boxes-only models: no grade metrics
        if labelled:  # bad labels are reported before any scoring
            labelled = _manifest_labels(Path(a.input), runner.class_names) is not None
        s = score(runner, a.input, a.output, a.overlays, a.batch_size, a.device, a.num_workers, None, a.retry_errors, not a.no_progress,
                  box_threshold=a.box_threshold, heatmaps=a.heatmaps, intrinsics=a.intrinsics)
    except (InputError, RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"lineside score: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"scored {s.scored}, errors {s.errors}, skipped (already done) {s.skipped} of {s.total} inputs "
        f"in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s, {s.backend}) → {s.output}"
    )
    metrics = evaluate_scores(a.output, a.input, runner.class_names) if labelled else None
    if metrics:
        _print_metrics(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
