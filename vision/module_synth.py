"""Whole-module EL images built from real ELPV cells, with their cell grid as the truth.

ELPV ships single cells cut out of 44 modules. :func:`synth_module` lays real cells out as a
module — ``rows`` x ``cols`` cells (6x10, 6x12), or half-cells (each cell's top and bottom half
in two rows: 12x12 half-cells is a 6x12 module of 144 half-cells) — with dark gaps between cells
and a dark frame, then photographs it: a random perspective warp (corner jitter and a small
rotation), a dark uneven background, a slight blur and sensor noise. The cells are resized with
:func:`vision.preprocess.resize_frame` (the one resize) and warped with ``cv2.warpPerspective``.

The truth comes with each :class:`SyntheticModule`: the homography from the flat layout to the
image, the grid line crossings (``nodes``: the gap centres, the outer lines half a gap outside the
outer cells, the same points
:meth:`vision.module_grid.ModuleGrid.nodes` estimates), each cell's corners, and which ELPV cell
(and grade) sits where.

    from lineside.vision.module_synth import synth_module
    m = synth_module(rows=6, cols=10, cell_px=120, seed=3)
    PIL.Image.fromarray(m.image).save("module.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["MODULE_LAYOUTS", "SyntheticModule", "synth_module"]

# name → (rows, cols, half-cells)
MODULE_LAYOUTS = {"6x10": (6, 10, False), "6x12": (6, 12, False), "12x12h": (12, 12, True)}


@dataclass
class SyntheticModule:
    """A generated module image and its truth.

    Attributes:
        image: (H, W) uint8 EL image.
        rows, cols: grid size (half-cell rows count separately).
        half: whether the pieces are half-cells.
        homography: (3, 3) flat layout px → image px.
        nodes: (rows + 1, cols + 1, 2) grid line crossings in image px (x, y): the centres of the gaps,
            the outer lines half a gap outside the outer cells (pixel-centre coordinates).
        cell_quads: (rows, cols, 4, 2) each cell's own corners (TL, TR, BR, BL, gaps excluded) in image px.
        cells: (rows, cols) index of the ELPV cell in :func:`vision.elpv.elpv_records` order.
        grades: (rows, cols) ELPV grade of that cell (0 ok … 3 severe).
        cell_px: (h, w) of one piece in the flat layout.
        gap_px: gap between pieces in the flat layout.
        meta: the settings, and the flat layout: ``flat_size`` (H, W), ``flat_xs`` / ``flat_ys`` (the grid
            lines in flat px, as ``nodes`` before the warp).
    """

    image: np.ndarray
    rows: int
    cols: int
    half: bool
    homography: np.ndarray
    nodes: np.ndarray
    cell_quads: np.ndarray
    cells: np.ndarray
    grades: np.ndarray
    cell_px: tuple[int, int]
    gap_px: int
    meta: dict = field(default_factory=dict)


def _apply(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    flat = pts.reshape(-1, 2)
    q = np.c_[flat, np.ones(len(flat))] @ h.T
    return (q[:, :2] / q[:, 2:3]).reshape(pts.shape)


def synth_module(
    rows: int = 6,
    cols: int = 10,
    cell_px: int = 120,
    gap_px: int | None = None,
    half: bool = False,
    warp: float = 0.04,
    rotate_deg: float = 3.0,
    noise: float = 3.0,
    cells: np.ndarray | list[int] | None = None,
    margin: float = 0.08,
    shade: float = 0.12,
    blur: float = 0.6,
    seed: int = 0,
) -> SyntheticModule:
    """A module of real ELPV cells, warped and photographed.

    Args:
        rows, cols: pieces per column / row (with ``half``, rows counts half-cell rows and must be even).
        cell_px: side of a full cell in the flat layout (ELPV cells are 300 px; they are resized to this).
        gap_px: dark gap between pieces (default: about 4 % of ``cell_px``, at least 3 px).
        half: cut each cell into its top and bottom half (two rows).
        warp: perspective: each image corner moves by up to this share of the module's size.
        rotate_deg: a rotation of up to this many degrees.
        noise: Gaussian sensor noise, grey levels (std).
        cells: ELPV indices to use, row by row (``rows * cols`` full cells, or half as many with ``half``);
            default: drawn at random.
        margin: background around the module, share of the image's size.
        shade: uneven illumination: brightness ramps by up to this share across the image, per axis.
        blur: Gaussian blur of the optics, px (std; 0: none).
        seed: everything random follows it.
    """
    import cv2
    from lineside.vision.elpv import elpv_records
    from lineside.vision.io import read_image
    from lineside.vision.preprocess import resize_frame

    if half and rows % 2:
        raise ValueError(f"half-cells come in pairs of rows; rows={rows} is odd")
    rng = np.random.default_rng(seed)
    records = elpv_records()
    n_cells = rows * cols // (2 if half else 1)
    if cells is None:
        cells = rng.choice(len(records), n_cells, replace=False)
    cells = np.asarray(cells, dtype=int)
    if len(cells) != n_cells:
        raise ValueError(f"a {rows}x{cols}{' half-cell' if half else ''} module takes {n_cells} cells, got {len(cells)}")
    gap = int(gap_px if gap_px is not None else max(3, round(0.04 * cell_px)))
    piece_h, piece_w = (cell_px // 2, cell_px) if half else (cell_px, cell_px)
    frame = max(gap, int(round(0.12 * cell_px)))  # dark frame around the cells
    flat_h = frame * 2 + rows * piece_h + (rows - 1) * gap
    flat_w = frame * 2 + cols * piece_w + (cols - 1) * gap
    frame_level = int(rng.integers(8, 22))
    flat = np.full((flat_h, flat_w), frame_level, dtype=np.uint8)
    where = np.empty((rows, cols), dtype=int)
    for k, idx in enumerate(cells):
        cell = resize_frame(read_image(records[idx].path, 1), (cell_px, cell_px))[..., 0]
        pieces = [cell[: cell_px // 2], cell[cell_px // 2: 2 * (cell_px // 2)]] if half else [cell]
        for part, piece in enumerate(pieces):
            if half:
                r, c = 2 * (k // cols) + part, k % cols
            else:
                r, c = divmod(k, cols)
            y0, x0 = frame + r * (piece_h + gap), frame + c * (piece_w + gap)
            flat[y0: y0 + piece_h, x0: x0 + piece_w] = piece
            where[r, c] = idx
    # truth in flat px (pixel centres): the gap centres, the outer lines half a gap outside the outer cells
    x_left = frame + np.arange(cols) * (piece_w + gap) - 0.5  # left edge of each piece
    y_top = frame + np.arange(rows) * (piece_h + gap) - 0.5
    xs = np.concatenate([x_left - gap / 2, [x_left[-1] + piece_w + gap / 2]])
    ys = np.concatenate([y_top - gap / 2, [y_top[-1] + piece_h + gap / 2]])
    gx, gy = np.meshgrid(xs, ys)
    nodes_flat = np.stack([gx, gy], -1)
    tl = np.stack(np.meshgrid(x_left + 0.5, y_top + 0.5), -1)
    br = tl + np.array([piece_w - 1, piece_h - 1], dtype=np.float64)
    quads_flat = np.stack([tl, np.stack([br[..., 0], tl[..., 1]], -1), br, np.stack([tl[..., 0], br[..., 1]], -1)], axis=2)

    # the camera: the flat module placed in a larger frame, corners jittered, a small rotation
    out_w = int(round(flat_w * (1 + 2 * margin)))
    out_h = int(round(flat_h * (1 + 2 * margin)))
    src = np.array([[0, 0], [flat_w - 1, 0], [flat_w - 1, flat_h - 1], [0, flat_h - 1]], np.float64)
    centre = np.array([(out_w - 1) / 2, (out_h - 1) / 2])
    theta = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = (src - src.mean(0)) @ rot.T + centre
    dst += rng.uniform(-warp, warp, size=(4, 2)) * np.array([flat_w, flat_h])
    homography = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32)).astype(np.float64)
    background = int(rng.integers(4, 30))
    image = cv2.warpPerspective(flat, homography, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=background).astype(np.float32)
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    ramp = 1.0 + shade * rng.uniform(-1, 1) * (xx / out_w - 0.5) + shade * rng.uniform(-1, 1) * (yy / out_h - 0.5)
    image = image * ramp
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    grades = np.array([[records[i].label for i in row] for row in where])
    return SyntheticModule(image=image, rows=rows, cols=cols, half=half, homography=homography,
                           nodes=_apply(homography, nodes_flat), cell_quads=_apply(homography, quads_flat),
                           cells=where, grades=grades, cell_px=(piece_h, piece_w), gap_px=gap,
                           meta={"warp": warp, "rotate_deg": rotate_deg, "noise": noise, "shade": shade, "blur": blur, "seed": seed,
                                 "flat_size": (flat_h, flat_w), "flat_xs": xs, "flat_ys": ys})
