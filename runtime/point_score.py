"""Batch scoring of point clouds with a grasp model: one row per file with its ranked grasps.

    lineside score --model runs/parts_grasp/checkpoints/best.ckpt --input scans/ --output grasps.csv --overlays ov/
    lineside score --model export/grasp/model.onnx --input "line3/*.ply" --output grasps.parquet
    lineside score --model export/grasp/ --input depth/ --intrinsics camera.json --output grasps.csv
    lineside score --model runs/grasp_ranker/ranker_procedural.pt --input scans/ --output grasps.csv  # a grasp ranker file

:func:`lineside.runtime.score.score` hands a model that takes ``points`` here. Inputs are
``.ply``/``.pcd``/``.xyz``/``.npy`` clouds in metres, or depth images (16-bit PNG in mm, float32
TIFF/``.npy`` in m) with pinhole intrinsics (``--intrinsics JSON``, else ``<stem>.json`` or
``intrinsics.json`` beside the image); a folder's ``.json`` files are intrinsics, not inputs. Each
file is prepared as in training (:mod:`export.point_inputs`: outliers, voxel, normals, sampled to
the model's ``num_points``, sensor metres) and the graph centres, scales and decodes.

One row per input: ``path``, ``points`` (real points fed to the model), ``num_grasps``,
``best_score``, ``grasps`` (JSON list, best first, of ``{"position": [x, y, z] m, "approach": unit
vector palm → fingertips, "closing": unit vector along which the jaws close, "width": m, "score"}``
in the sensor frame of the file), ``error``. A file that cannot be read or prepared (corrupt, empty,
NaN only, millimetres, too few points) is a row with its error and the batch goes on; rows are
appended and fsync'ed per batch and a second run resumes, as for images.

Overlays (``--overlays DIR``): one PNG per cloud, the points in 3-D (matplotlib, Agg) with each
grasp drawn as a gripper outline (fingers, palm, wrist), the best in red.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from lineside.runtime.backend import Backend
from lineside.export.point_inputs import PointPreprocessing, is_cloud_input, stack_inputs
from lineside.runtime.records import RecordBuilder
from lineside.runtime.results import ScoreSummary, finalise_parquet, open_journal
from lineside.vision.io import InputError, collect_inputs

__all__ = ["COLUMNS", "draw_grasp_overlay", "gripper_outline", "score_points"]

log = logging.getLogger("lineside.score")

COLUMNS = ["path", "points", "num_grasps", "best_score", "grasps", "error"]


def gripper_outline(position, approach, closing, width, finger_depth: float = 0.04, tip_margin: float = 0.005) -> list[np.ndarray]:
    """Polylines (each (M, 3), metres) of a parallel-jaw gripper at a grasp: two fingers, the palm and the wrist.

    The contacts sit at ``position ± width / 2 · closing``, ``tip_margin`` behind the fingertips; the
    fingers reach ``finger_depth`` back along ``-approach`` to the palm (the defaults are
    :class:`lineside.pointcloud.grasp_labels.ParallelJawGripper`'s).
    """
    c, a, b = (np.asarray(v, np.float64) for v in (position, approach, closing))
    half = float(width) / 2 * b
    tip, base = tip_margin * a, -(finger_depth - tip_margin) * a
    fingers = [np.stack([c + s * half + base, c + s * half + tip]) for s in (1.0, -1.0)]
    palm = np.stack([c + half + base, c - half + base])
    wrist = np.stack([c + base, c + base - finger_depth * a])
    return [*fingers, palm, wrist]


def draw_grasp_overlay(points: np.ndarray, grasps: list[dict], target: Path, title: str = "", max_points: int = 4000) -> Path:
    """Render ``points`` (M, 3) metres with ``grasps`` (dicts of :func:`grasps_from_outputs`) as gripper outlines to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = np.asarray(points, np.float64)
    if len(pts) > max_points:
        pts = pts[np.linspace(0, len(pts) - 1, max_points).astype(int)]
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    if len(pts):
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=float(np.clip(2000 / len(pts), 1.5, 12)), c=pts[:, 2], cmap="viridis", alpha=0.7,
                   linewidths=0)
    drawn = [pts] if len(pts) else []
    for rank, g in enumerate(grasps):
        colour = "red" if rank == 0 else "darkorange"
        for line in gripper_outline(g["position"], g["approach"], g["closing"], g["width"]):
            ax.plot(line[:, 0], line[:, 1], line[:, 2], color=colour, linewidth=2.5 if rank == 0 else 1.2)
            drawn.append(line)
    if drawn:  # equal axes, so the gripper keeps its shape
        allp = np.concatenate(drawn)
        mid, span = (allp.max(0) + allp.min(0)) / 2, max(float(np.ptp(allp, axis=0).max()), 1e-3) / 2
        ax.set_xlim(mid[0] - span, mid[0] + span)
        ax.set_ylim(mid[1] - span, mid[1] + span)
        ax.set_zlim(mid[2] - span, mid[2] + span)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.view_init(elev=25, azim=-55)  # oblique: the part's depth and the grippers' approach both show
    if title:
        ax.set_title(title, fontsize=9)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, target)
    return target


def _overlay_target(path: str, out_dir: Path, root: str) -> Path:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if root else os.path.basename(path)
    target = out_dir / (rel if not rel.startswith("..") else os.path.basename(path))
    return target.with_name(target.name + ".png")  # part.ply → part.ply.png: a .ply and a .npy of one stem stay apart


def score_points(
    runner: Backend,
    inputs: str | Iterable[str],
    output: str | os.PathLike,
    overlays: str | os.PathLike | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    intrinsics: str | os.PathLike | None = None,
) -> ScoreSummary:
    """Score point-cloud files with a point model's backend and write/resume ``output`` (.csv or .parquet).

    See the module docstring.
    """
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"{output}: output must end in .csv or .parquet")
    prep = PointPreprocessing.from_metadata(runner.metadata)
    records = RecordBuilder(runner)
    k = None
    if intrinsics is not None:
        from lineside.pointcloud.io import read_intrinsics

        k = read_intrinsics(intrinsics)  # a wrong file fails before any scoring
    if isinstance(inputs, str):
        paths = [p for p in collect_inputs(inputs) if not (os.path.isdir(inputs) and p.lower().endswith(".json"))]
        if not paths:
            raise InputError(f"{inputs}: no point clouds or depth images found")
    else:
        paths = list(inputs)
    if isinstance(inputs, str) and os.path.isdir(inputs):
        root = inputs
    else:  # a glob or a list: overlays keep the paths below the inputs' common folder (tools/*/point-cloud.ply share a name)
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""

    parquet = output.suffix.lower() == ".parquet"
    writer, previous, done = open_journal(output, COLUMNS, retry_errors, project=True)
    todo = [p for p in paths if p not in done]

    def load(path: str) -> dict | str:
        if not is_cloud_input(path):
            return f"{path}: unsupported file type {Path(path).suffix or '(no extension)'!r} for a point model; expected .ply, .pcd, .xyz, .npy or a depth image"
        try:
            return prep.load(path, k)
        except Exception as exc:  # noqa: BLE001 - any unusable file is a row with its error
            msg = str(exc)
            return msg if path in msg else f"{path}: {msg}"

    overlay_dir = Path(overlays) if overlays else None
    workers = min(4, max(1, os.cpu_count() or 2)) if num_workers is None else num_workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloud") if workers > 0 else None
    scored = errors = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="cloud", desc=f"scoring clouds ({runner.name})", disable=not progress, dynamic_ncols=True)
    try:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            items = list(pool.map(load, chunk)) if pool is not None else [load(p) for p in chunk]
            good = [i for i, it in enumerate(items) if isinstance(it, dict)]
            out: dict[str, np.ndarray] = {}
            if good:
                try:
                    out = runner(stack_inputs([items[i] for i in good]))
                except Exception as exc:  # noqa: BLE001 - a failing batch: its clouds one by one, each failing one gets its error
                    parts, ok = [], []
                    for i in good:
                        try:
                            if len(good) == 1:
                                raise exc
                            parts.append(runner(stack_inputs([items[i]])))
                            ok.append(i)
                        except Exception as one:  # noqa: BLE001
                            items[i] = f"{chunk[i]}: inference failed: {type(one).__name__}: {str(one)[:300]}"
                    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
                    good = ok
            where = {i: j for j, i in enumerate(good)}
            rows = []
            for i, path in enumerate(chunk):
                item = items[i]
                if not isinstance(item, dict):
                    rows.append({c: "" for c in COLUMNS} | {"path": path, "error": item})
                    errors += 1
                    continue
                grasps = records.record(out, int(where[i])).get("grasps") or []
                n_real = int(item["point_mask"].sum())
                rows.append({"path": path, "points": n_real, "num_grasps": len(grasps),
                             "best_score": f"{grasps[0]['score']:.6f}" if grasps else "",
                             "grasps": json.dumps(grasps, separators=(",", ":")), "error": ""})
                scored += 1
                if overlay_dir is not None:
                    try:
                        draw_grasp_overlay(item["points"][item["point_mask"]], grasps, _overlay_target(path, overlay_dir, root),
                                           f"{os.path.relpath(path, root) if root else Path(path).name}: {len(grasps)} grasps"
                                           + (f", best {grasps[0]['score']:.2f}" if grasps else ""))
                    except Exception as exc:  # noqa: BLE001 - an overlay never costs a result
                        log.warning("overlay of %s failed: %s", path, exc)
            writer.append(rows)
            bar.update(len(rows))
            bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    if parquet:
        finalise_parquet(writer, output, previous, {"points": int, "num_grasps": int, "best_score": float})
    return ScoreSummary(len(paths), len(paths) - len(todo), scored, errors, time.perf_counter() - start, str(output), runner.describe())
