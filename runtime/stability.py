"""Decision stability: how often a model's grade changes under changes every camera makes anyway.

    lineside bench --model runs/quickstart/checkpoints/best.ckpt --stability       # the 524 ELPV test-block cells
    lineside bench --model export/model.onnx --stability --calib my_cells/          # any backend, your own frames

Each cell is graded as decoded, then again after a perturbation of its raw frame (before any
resize, as a sensor would produce it), on the same backend:

- ``noise ±1``: every pixel gets an independent offset drawn uniformly from {-1, 0, +1} grey
  levels, clipped to 0..255 (sensor noise well under one grey level's worth of signal);
- ``jpeg q95``: a JPEG round trip at quality 95 (OpenCV / libjpeg; a camera or frame grabber
  that compresses).

The figure is the share of cells whose grade changes. A model that changes its grade on
sub-grey-level changes changes it between two shots of the same cell, and between any two
preprocessing paths that differ by a rounding, which is why every path shares one resize
(:func:`vision.preprocess.resize_uint8`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lineside.vision.preprocess import frames_to_batch

__all__ = [
    "PERTURBATIONS",
    "StabilityRow",
    "decision_stability",
    "format_stability",
    "grey_noise",
    "jpeg_round_trip",
    "stability_frames",
]


def grey_noise(frame: np.ndarray, rng: np.random.Generator, levels: int = 1) -> np.ndarray:
    """``frame`` (H, W[, C]) uint8 + independent integer offsets uniform in [-levels, levels], clipped to 0..255."""
    noise = rng.integers(-levels, levels + 1, size=frame.shape, dtype=np.int16)
    return np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def jpeg_round_trip(frame: np.ndarray, quality: int = 95) -> np.ndarray:
    """``frame`` (H, W[, C]) uint8 (grey or RGB) encoded as JPEG at ``quality`` and decoded, same shape."""
    import cv2

    img = frame[:, :, 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if out.ndim == 3:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return out.reshape(frame.shape)


# name → (frame, rng) → perturbed frame
PERTURBATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise ±1": lambda f, rng: grey_noise(f, rng, 1),
    "jpeg q95": lambda f, rng: jpeg_round_trip(f, 95),
}


@dataclass
class StabilityRow:
    """One perturbation over ``n`` cells.

    Attributes:
        perturbation: its name (a key of :data:`PERTURBATIONS`).
        n: cells graded.
        changed: cells whose grade differs from the unperturbed one.
        share: ``changed / n``.
        max_prob_change: largest |Δ| of any grade probability.
        mean_prob_change: mean over cells of the largest |Δ| of a grade probability.
    """

    perturbation: str
    n: int
    changed: int
    share: float
    max_prob_change: float
    mean_prob_change: float


def _grade(backend, frames: Sequence[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    grades, probs = [], []
    for i in range(0, len(frames), batch_size):
        out = backend(frames_to_batch(frames[i : i + batch_size], backend.input_size))
        grades.append(np.asarray(out["grade"]).reshape(-1))
        probs.append(np.asarray(out["grade_probs"], dtype=np.float64))
    return np.concatenate(grades), np.concatenate(probs)


def decision_stability(
    backend,
    frames: Sequence[np.ndarray],
    perturbations: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> list[StabilityRow]:
    """The share of grades that change under each perturbation.

    Args:
        backend: a :class:`runtime.backend.Backend` of a grading model (``grade`` and
            ``grade_probs`` outputs), any format.
        frames: decoded uint8 cells (H, W[, C]) at their own size; perturbed as they are, then
            resized to the backend's input size by :func:`vision.preprocess.frames_to_batch`.
        perturbations: names from :data:`PERTURBATIONS` (default: all).
        seed: for the noise.
        batch_size: frames per backend call.

    Returns one :class:`StabilityRow` per perturbation, in the order asked.
    """
    if "grade" not in backend.output_names:
        raise ValueError(f"{backend.describe()}: decision stability needs a grading model (outputs {backend.output_names})")
    if not len(frames):
        raise ValueError("no frames to grade")
    names = list(perturbations or PERTURBATIONS)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; choose from {list(PERTURBATIONS)}")
    frames = [f if f.ndim == 3 else f[:, :, None] for f in frames]
    base_grade, base_probs = _grade(backend, frames, batch_size)
    rows = []
    for k, name in enumerate(names):
        rng = np.random.default_rng([seed, k])
        grade, probs = _grade(backend, [PERTURBATIONS[name](f, rng) for f in frames], batch_size)
        changed = int((grade != base_grade).sum())
        dp = np.abs(probs - base_probs).max(axis=1)
        rows.append(StabilityRow(name, len(frames), changed, changed / len(frames), float(dp.max()), float(dp.mean())))
    return rows


def stability_frames(calib: str | os.PathLike | None, channels: int, split: str = "test", limit: int | None = None,
                     seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Decoded cells at their own size and their paths: every cell of the ELPV ``split`` blocks (the
    split ``train.py`` makes; 524 test cells), or the images of ``calib`` (folder, glob or manifest);
    ``limit`` keeps that many, spread evenly. Unreadable files are skipped."""
    from lineside.vision.io import collect_inputs, read_image

    if calib is None:
        from lineside.vision.elpv import elpv_records
        from lineside.vision.splits import block_split

        records = elpv_records()
        idx = block_split([r.label for r in records], 60, 0.1, 0.2, seed)[split]
        paths = [records[i].path for i in sorted(idx)]
    else:
        paths = collect_inputs(os.fspath(calib))
    if limit and limit < len(paths):
        paths = [paths[i] for i in dict.fromkeys(np.linspace(0, len(paths) - 1, num=limit).round().astype(int).tolist())]
    frames, used = [], []
    for p in paths:
        try:
            frames.append(read_image(p, channels))
            used.append(p)
        except Exception:  # noqa: BLE001 - a bad file is left out of the figure
            continue
    return frames, used


def format_stability(rows: Sequence[StabilityRow], backend: str, source: str) -> str:
    """A markdown table of the rows."""
    lines = [f"decision stability of {backend} on {rows[0].n if rows else 0} cells ({source}): "
             "share of grades that change under each perturbation of the raw frame", "",
             "| perturbation | cells | grade changed | share | max abs diff grade_probs | mean max abs diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.perturbation} | {r.n} | {r.changed} | **{100 * r.share:.2f}%** | {r.max_prob_change:.3f} | {r.mean_prob_change:.4f} |"
              for r in rows]
    return "\n".join(lines)
