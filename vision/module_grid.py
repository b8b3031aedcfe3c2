"""The cell grid of a whole-module EL image: module outline → perspective correction → gaps between cells.

An EL station photographs a whole module (6×10 or 6×12 cells, 144 half-cells …). Cells are bright,
the gaps between them, the frame and the background are dark. :func:`find_module_grid` finds

1. **the module outline**: Otsu threshold of the blurred frame, a closing that bridges the gaps
   between cells, the largest external contour, its convex hull reduced to a quadrilateral by
   ``cv2.approxPolyDP`` (growing tolerance; ``cv2.minAreaRect`` when no four-corner polygon fits),
   corners ordered top-left, top-right, bottom-right, bottom-left, then moved to where straight lines
   fitted to the four sides cross (so chamfered or dark corner cells do not cut the corners);
2. **the perspective correction**: the homography that maps that quad onto an upright rectangle of
   the module's own pixel size (``cv2.getPerspectiveTransform``), and the rectified module
   (``cv2.warpPerspective``);
3. **the gaps**: per axis, the median intensity profile of the rectified module (median across the
   other axis, so dark cells and cracks barely move it). For each candidate count ``n`` a comb of
   ``n - 1`` evenly spaced gaps is scored by how much darker the profile is at the comb's teeth than
   half a period away (the cell centres). A divisor of the true count puts gaps at "cell centres" and a
   multiple puts busbars on teeth, so both score lower than the true count. A ``grid`` hint (``6x10``,
   in either orientation) fixes the counts. Each gap is then moved to the centre of its dip (darkness
   centroid within a tenth of a period) unless that strays from a straight-line fit.

Returns a :class:`ModuleGrid`: the quad, the homography, the cell boundaries in rectified pixels, and
helpers to map points both ways, cut the cells and list the cell corners in image pixels. An image
where no bright quadrilateral or no regular gaps can be found raises :class:`ModuleGridError` naming
the file and what is missing.

Cell crops run from gap centre to gap centre (the outer ones half a gap outside the outer cells),
so each crop keeps a thin dark border, as ELPV's cut cells do. Resizing them to a model's input is the caller's work,
with :func:`vision.preprocess.frames_to_batch` (the one resize of every path).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ModuleGrid", "ModuleGridError", "find_module_grid", "find_module_quad", "gap_positions", "parse_grid"]

MAX_CELLS_PER_SIDE = 30  # auto counts try 2..30 cells per side
MIN_PERIOD_PX = 12  # a cell narrower than this (rectified px) is not looked for
MIN_CONTRAST = 0.1  # gap dips less in-cell dips, share of the median brightness: below this, no grid


class ModuleGridError(ValueError):
    """No module, or no cell grid, in an image; the message names the file and what is missing."""


def parse_grid(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"6x10"`` (rows x columns, ``x``/``X``/``*``/``,``) or ``(6, 10)`` → ``(6, 10)``; None stays None."""
    if text is None or text == "" or text == "auto":
        return None
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"grid {text!r}: expected ROWSxCOLS, e.g. 6x10 (or 'auto')")
        rows, cols = int(m.group(1)), int(m.group(2))
    else:
        rows, cols = (int(v) for v in text)
    if not (1 <= rows <= 200 and 1 <= cols <= 200) or rows * cols < 2:
        raise ValueError(f"grid {rows}x{cols}: a module has at least 2 cells and at most 200 per side")
    return rows, cols


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) / (H, W, C) uint8 → (H, W) uint8."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0] if image.shape[2] == 1 else image[..., :3].mean(axis=2).round().astype(np.uint8)
    if image.dtype != np.uint8:
        raise TypeError(f"module images are uint8, got {image.dtype}")
    return image


def _order_corners(pts: np.ndarray) -> np.ndarray:
    """Four (x, y) points → top-left, top-right, bottom-right, bottom-left (by angle around the centre)."""
    pts = np.asarray(pts, np.float64).reshape(4, 2)
    c = pts.mean(axis=0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    pts = pts[np.argsort(ang)]  # clockwise in image coordinates, starting near -pi (left)
    start = int(np.argmin(pts.sum(axis=1)))  # top-left: smallest x + y
    return np.roll(pts, -start, axis=0)


def find_module_quad(image: np.ndarray, path: str = "image") -> tuple[np.ndarray, float]:
    """The module's outline: ``(quad, fill)``, quad (4, 2) float64 image px (TL, TR, BR, BL), ``fill`` =
    contour area / quad area. Raises :class:`ModuleGridError` when no large bright quadrilateral is there."""
    import cv2

    gray = _gray(image)
    h, w = gray.shape
    if min(h, w) < 32:
        raise ModuleGridError(f"{path}: {w}x{h} px is too small for a module image")
    small = max(1, int(round(max(h, w) / 1024)))  # work at about 1 Mpx; the quad is scaled back
    g = cv2.resize(gray, (w // small, h // small), interpolation=cv2.INTER_AREA) if small > 1 else gray
    g = cv2.GaussianBlur(g, (0, 0), 2.0)
    if int(g.max()) - int(g.min()) < 16:
        raise ModuleGridError(f"{path}: no module outline: the image is nearly uniform (grey levels {g.min()}..{g.max()})")
    _, mask = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = max(3, int(round(min(g.shape) * 0.02)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)  # every edge pixel: the side fits need them
    if not contours:
        raise ModuleGridError(f"{path}: no module outline: no bright region above the Otsu threshold")
    contour = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(contour)
    if area < 0.05 * g.shape[0] * g.shape[1]:
        raise ModuleGridError(f"{path}: no module outline: the largest bright region covers {area / g.size:.1%} of the image (< 5%)")
    hull = cv2.convexHull(contour)
    perimeter = cv2.arcLength(hull, True)
    points = contour.reshape(-1, 2).astype(np.float64)
    starts = [_order_corners(cv2.boxPoints(cv2.minAreaRect(hull)).astype(np.float64))]
    for eps in (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1):
        poly = cv2.approxPolyDP(hull, eps * perimeter, True)
        if len(poly) == 4:
            starts.append(_order_corners(poly.reshape(4, 2).astype(np.float64)))
            break
        if len(poly) < 4:
            break
    fitted = [_fit_sides(q, points) for q in starts]
    quad = max(fitted, key=lambda q: _support(q, points))
    quad_area = float(cv2.contourArea(quad.astype(np.float32)))
    fill = area / quad_area if quad_area > 0 else 0.0
    if fill < 0.85:
        raise ModuleGridError(f"{path}: no module outline: the largest bright region is not a quadrilateral "
                              f"(it fills {fill:.0%} of its four-corner outline, a module fills over 85%)")
    # half-pixel centres: a pixel i of the small image covers [i·s, (i+1)·s) of the full one
    return (quad + 0.5) * small - 0.5, fill


def _intersect(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """Crossing of two lines given as (point, unit direction); None when (nearly) parallel."""
    (p, d), (q, e) = a, b
    den = d[0] * e[1] - d[1] * e[0]
    if abs(den) < 1e-9:
        return None
    t = ((q[0] - p[0]) * e[1] - (q[1] - p[1]) * e[0]) / den
    return p + t * d


def _fit_sides(quad: np.ndarray, contour: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Corners from straight lines fitted to the outline's four sides: a side's line is fitted
    (``cv2.fitLine``, Huber) to the contour points near it, away from its ends, so cut-off cell corners
    (chamfered mono cells) and a dark corner cell do not pull the corner in; a few rounds let a
    corner that started off move out to where the sides cross."""
    import cv2

    for round_ in range(rounds):
        lines = []
        for i in range(4):
            a, b = quad[i], quad[(i + 1) % 4]
            side = b - a
            length = float(np.linalg.norm(side))
            if length < 8:
                return quad
            d = side / length
            rel = contour - a
            t = rel @ d / length
            dist = np.abs(rel[:, 0] * d[1] - rel[:, 1] * d[0])
            tol = max(3.0, 0.05 * length) if round_ == 0 else max(2.0, 0.003 * length)  # then: the outermost edge only
            near = (t > 0.12) & (t < 0.88) & (dist < tol)
            if near.sum() < 8:
                return quad
            vx, vy, x0, y0 = cv2.fitLine(contour[near].astype(np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
            lines.append((np.array([x0, y0], np.float64), np.array([vx, vy], np.float64)))
        corners = [_intersect(lines[(i - 1) % 4], lines[i]) for i in range(4)]
        if any(c is None for c in corners):
            return quad
        new = np.array(corners)
        if np.abs(new - quad).max() > 0.5 * max(np.ptp(quad[:, 0]), np.ptp(quad[:, 1])):
            return quad  # lines that cross far away: keep the polygon's corners
        moved = np.abs(new - quad).max()
        quad = new
        if moved < 0.05:
            break
    return quad


def _support(quad: np.ndarray, points: np.ndarray, tol: float = 2.5) -> float:
    """Share of the contour points within ``tol`` px of the quad's sides."""
    best = np.full(len(points), np.inf)
    for i in range(4):
        a, b = quad[i], quad[(i + 1) % 4]
        d = b - a
        t = np.clip(((points - a) @ d) / max(float(d @ d), 1e-9), 0, 1)
        best = np.minimum(best, np.linalg.norm(points - (a + t[:, None] * d), axis=1))
    return float((best < tol).mean())


def _smooth(profile: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.3:
        return profile
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return np.convolve(np.pad(profile, r, mode="edge"), k, mode="valid")


def _sample(profile: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.interp(x, np.arange(len(profile)), profile)


def _comb_contrast(profile: np.ndarray, n: int) -> float:
    """How well ``n`` evenly spaced cells explain the dips of the profile: the mean depth of the ``n - 1``
    dips at the comb's teeth (the darkest value within a 20th of a period, so a gap a pixel or two off
    its even position still counts) minus the mean depth of the deepest dip inside each cell (more than
    an eighth of a period from its ends). Depths are shares of the median brightness.

    The true count: gaps on the teeth, at most busbars inside the cells. A divisor of it leaves whole gaps
    inside its cells; a multiple puts busbars or cell centres on teeth: both score lower."""
    length = len(profile)
    p = (length - 1) / n
    scale = max(float(np.median(profile)), 1.0)
    depth = (scale - profile) / scale
    r = max(1, int(round(p / 20)))
    on = np.array([depth[max(0, int(round(g)) - r): int(round(g)) + r + 1].max() for g in p * np.arange(1, n)])
    m = max(1, int(np.ceil(p / 8)))
    off = []
    for k in range(n):
        lo, hi = int(np.floor(k * p)) + m, int(np.ceil((k + 1) * p)) - m
        if hi > lo:
            off.append(depth[lo:hi].max())
    return float(on.mean() - (np.mean(off) if off else 0.0))


def _refine(profile: np.ndarray, n: int) -> np.ndarray:
    """Boundaries of ``n`` cells along a profile: each gap moved to the darkness centroid of its dip
    (within a tenth of a period of the even position), kept within a 20th of a period of a straight
    line fitted through them, and the outer boundaries extrapolated on that line (half a gap outside
    the outer cells, as the inner ones sit mid-gap); with two cells the profile's ends are kept."""
    length = len(profile)
    p = (length - 1) / n
    even = p * np.arange(1, n)
    r = max(2, int(round(p / 10)))
    found = even.copy()
    for k, g in enumerate(even):
        lo, hi = max(0, int(np.floor(g)) - r), min(length, int(np.ceil(g)) + r + 1)
        seg = profile[lo:hi]
        depth = seg.max() - seg
        if depth.max() <= 1e-6:
            continue
        wgt = np.clip(depth - 0.6 * depth.max(), 0, None)
        found[k] = lo + float((wgt * np.arange(len(seg))).sum() / wgt.sum())
    if n <= 2:
        return np.concatenate([[0.0], found, [float(length - 1)]])
    k = np.arange(1, n)
    a, b = np.polyfit(k, found, 1)  # perspective is corrected: the spacing is even
    keep = np.abs(found - (a * k + b)) <= p / 20
    if keep.sum() >= 2:
        a, b = np.polyfit(k[keep], found[keep], 1)
    found = np.where(np.abs(found - (a * k + b)) > p / 20, a * k + b, found)
    return np.concatenate([[b], found, [a * n + b]])


def gap_positions(profile: np.ndarray, count: int | None = None, max_count: int = MAX_CELLS_PER_SIDE) -> tuple[np.ndarray, float]:
    """Cell boundaries along one axis of a rectified module: ``(bounds, contrast)``.

    ``profile``: (L,) intensity along the axis (dark gaps between bright cells). ``count``: the number of
    cells when known, else the count with the best comb contrast among 2..``max_count`` (periods of at
    least ``MIN_PERIOD_PX``). ``bounds``: (count + 1,) float pixel positions, 0 and L - 1 at the ends."""
    profile = np.asarray(profile, np.float64)
    length = len(profile)
    sm = _smooth(profile, max(0.5, length / 1500))
    if count is None:
        counts = [n for n in range(2, max_count + 1) if length / n >= MIN_PERIOD_PX]
        if not counts:
            return np.array([0.0, float(length - 1)]), 0.0
        scores = [_comb_contrast(sm, n) for n in counts]
        count = counts[int(np.argmax(scores))]
        contrast = max(scores)
    else:
        contrast = _comb_contrast(sm, count) if count > 1 else 1.0
    return _refine(sm, count) if count > 1 else np.array([0.0, float(length - 1)]), contrast


@dataclass
class ModuleGrid:
    """The cell grid of one module image.

    Attributes:
        quad: (4, 2) module outline in image px (x, y), top-left, top-right, bottom-right, bottom-left.
        homography: (3, 3) image px → rectified px.
        size: (H, W) of the rectified module.
        ys: (rows + 1,) row boundaries in rectified px (pixel centres): the gap centres, the outer ones
            half a gap outside the outer cells (the rectified module has a margin around the outline).
        xs: (cols + 1,) column boundaries in rectified px.
        contrast: (rows, columns) gap contrast: gap dip / median brightness (0 for a single row/column).
        image_size: (H, W) of the module image.
    """

    quad: np.ndarray
    homography: np.ndarray
    size: tuple[int, int]
    ys: np.ndarray
    xs: np.ndarray
    contrast: tuple[float, float]
    image_size: tuple[int, int]

    @property
    def rows(self) -> int:
        return len(self.ys) - 1

    @property
    def cols(self) -> int:
        return len(self.xs) - 1

    @property
    def inverse(self) -> np.ndarray:
        """(3, 3) rectified px → image px."""
        return np.linalg.inv(self.homography)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """(…, 2) rectified (x, y) → (…, 2) image (x, y)."""
        return _apply(self.inverse, points)

    def to_rectified(self, points: np.ndarray) -> np.ndarray:
        """(…, 2) image (x, y) → (…, 2) rectified (x, y)."""
        return _apply(self.homography, points)

    def nodes(self) -> np.ndarray:
        """(rows + 1, cols + 1, 2) grid line crossings in image px: the outline corners and the gap centres."""
        gx, gy = np.meshgrid(self.xs, self.ys)
        return self.to_image(np.stack([gx, gy], axis=-1))

    def cell_quads(self) -> np.ndarray:
        """(rows, cols, 4, 2) each cell's corners (TL, TR, BR, BL) in image px."""
        n = self.nodes()
        return np.stack([n[:-1, :-1], n[:-1, 1:], n[1:, 1:], n[1:, :-1]], axis=2)

    def cell_boxes(self) -> np.ndarray:
        """(rows, cols, 4) integer crop boxes ``x0, y0, x1, y1`` (x1, y1 exclusive) in rectified px."""
        xs = np.rint(self.xs).astype(int)
        ys = np.rint(self.ys).astype(int)
        xs[-1] += 1  # the last column / row ends after the outermost pixel
        ys[-1] += 1
        out = np.empty((self.rows, self.cols, 4), dtype=int)
        for r in range(self.rows):
            for c in range(self.cols):
                out[r, c] = (xs[c], ys[r], max(xs[c + 1], xs[c] + 1), max(ys[r + 1], ys[r] + 1))
        return out

    def rectify(self, image: np.ndarray) -> np.ndarray:
        """The module image (H, W[, C]) uint8 → the rectified module (size[0], size[1][, C]), bilinear."""
        import cv2

        h, w = self.size
        out = cv2.warpPerspective(np.ascontiguousarray(image), self.homography, (w, h), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
        return out[..., None] if image.ndim == 3 and out.ndim == 2 else out

    def cut(self, rectified: np.ndarray) -> list[np.ndarray]:
        """The cells of a rectified module, row by row: (h, w[, C]) views, gap centre to gap centre."""
        return [rectified[y0:y1, x0:x1] for x0, y0, x1, y1 in self.cell_boxes().reshape(-1, 4)]

    def to_dict(self) -> dict:
        """``rows``, ``cols``, ``quad`` (image px, TL TR BR BL) and the gap ``contrast`` as plain lists."""
        return {"rows": self.rows, "cols": self.cols, "quad": np.round(self.quad, 1).tolist(),
                "contrast": [round(float(v), 3) for v in self.contrast]}


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    flat = pts.reshape(-1, 2)
    q = np.c_[flat, np.ones(len(flat))] @ h.T
    return (q[:, :2] / q[:, 2:3]).reshape(pts.shape)


def _dip_centre(profile: np.ndarray, min_depth: float) -> float | None:
    """Darkness centroid of a profile's dip (index units), None when it dips less than ``min_depth`` grey levels."""
    depth = profile.max() - profile
    if depth.max() < min_depth:
        return None
    wgt = np.clip(depth - 0.6 * depth.max(), 0, None)
    return float((wgt * np.arange(len(profile))).sum() / wgt.sum())


def _gap_lines(rect: np.ndarray, bounds: np.ndarray, other: np.ndarray, min_depth: float) -> list[tuple[float, float] | None]:
    """Each inner gap of ``bounds`` (positions along axis 1 of ``rect``) measured in every cell of the
    other axis (``other``: its boundaries along axis 0), then fitted as a line ``pos = a + b·t`` (t along
    axis 0); None for a gap seen in fewer than two cells."""
    period = float(np.median(np.diff(bounds)))
    r = max(2, int(round(period / 10)))
    lines: list[tuple[float, float] | None] = []
    for g in bounds[1:-1]:
        lo, hi = max(0, int(np.floor(g)) - r), min(rect.shape[1], int(np.ceil(g)) + r + 1)
        ts, ps = [], []
        for t0, t1 in zip(other[:-1], other[1:]):
            a, b = int(round(t0 + 0.2 * (t1 - t0))), int(round(t1 - 0.2 * (t1 - t0)))
            if b - a < 2:
                continue
            c = _dip_centre(np.median(rect[a:b, lo:hi], axis=0), min_depth)
            if c is not None:
                ts.append(0.5 * (a + b - 1))
                ps.append(lo + c)
        if len(ts) < 2:
            lines.append(None)
            continue
        ts, ps = np.array(ts), np.array(ps)
        slope, icpt = np.polyfit(ts, ps, 1)
        ok = np.abs(ps - (icpt + slope * ts)) <= max(1.5, period / 40)  # a crack or a busbar beside the gap: out
        if ok.sum() >= 2 and not ok.all():
            slope, icpt = np.polyfit(ts[ok], ps[ok], 1)
        lines.append((float(icpt), float(slope)))
    return lines


def _refined_homography(rect: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray | None:
    """(3, 3) from the ideal grid (cell (r, c) spans [c, c + 1] x [r, r + 1]) to ``rect`` px, fitted
    (RANSAC) to the crossings of the gap lines measured cell by cell; None with too few crossings."""
    import cv2

    min_depth = 0.1 * max(float(np.median(rect)), 10.0)
    cols = _gap_lines(rect, xs, ys, min_depth)  # x = a + b·y
    rows = _gap_lines(rect.T, ys, xs, min_depth)  # y = a + b·x
    ideal, found = [], []
    for i, rl in enumerate(rows, start=1):
        for j, cl in enumerate(cols, start=1):
            if rl is None or cl is None:
                continue
            (a, b), (c, d) = cl, rl  # x = a + b y, y = c + d x
            den = 1 - b * d
            if abs(den) < 1e-6:
                continue
            x = (a + b * c) / den
            ideal.append((j, i))
            found.append((x, c + d * x))
    if len(found) < 6:
        return None
    h, _ = cv2.findHomography(np.array(ideal, np.float64), np.array(found, np.float64), cv2.RANSAC, 2.0)
    return h


def _profiles(rect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column intensity profiles (medians across the other axis) of a rectified gray module."""
    step = max(1, min(rect.shape) // 600)  # subsample the other axis: medians of a few hundred lines are enough
    rows = np.median(rect[:, ::step], axis=1)
    cols = np.median(rect[::step, :], axis=0)
    return rows, cols


def find_module_grid(image: np.ndarray, grid: str | Sequence[int] | None = None, path: str = "image",
                     max_count: int = MAX_CELLS_PER_SIDE) -> ModuleGrid:
    """The :class:`ModuleGrid` of a whole-module image (H, W) or (H, W, C) uint8.

    ``grid``: ``"6x10"`` / ``(6, 10)`` rows x columns when known (either orientation is accepted: the
    one whose gaps show more contrast wins), else ``None`` / ``"auto"``. ``path`` names the image in errors.
    Raises :class:`ModuleGridError` when the image shows no module or no regular grid of gaps."""
    import cv2

    hint = parse_grid(grid) if not isinstance(grid, tuple) else grid
    gray = _gray(image)
    quad, _ = find_module_quad(gray, path)
    tl, tr, br, bl = quad
    w = int(round(max(np.linalg.norm(tr - tl), np.linalg.norm(br - bl))))
    h = int(round(max(np.linalg.norm(bl - tl), np.linalg.norm(br - tr))))
    if min(w, h) < 2 * MIN_PERIOD_PX:
        raise ModuleGridError(f"{path}: the module outline is only {w}x{h} px")
    w, h = w + 1, h + 1  # the quad runs through the centres of the outermost module pixels: they map to m and m + w - 1
    m = max(4, int(round(0.02 * max(w, h))))  # a margin: the outer boundaries lie half a gap outside the outline
    dst = np.array([[m, m], [m + w - 1, m], [m + w - 1, m + h - 1], [m, m + h - 1]], np.float64)
    homography = cv2.getPerspectiveTransform(quad.astype(np.float32), dst.astype(np.float32)).astype(np.float64)
    rect = cv2.warpPerspective(gray, homography, (w + 2 * m, h + 2 * m), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    prof_rows, prof_cols = _profiles(rect[m: m + h, m: m + w])
    if hint is None:
        ys, cr = gap_positions(prof_rows, None, max_count)
        xs, cc = gap_positions(prof_cols, None, max_count)
    else:
        options = []
        for rows, cols in {hint, hint[::-1]}:
            if h / rows < MIN_PERIOD_PX / 2 or w / cols < MIN_PERIOD_PX / 2:
                continue
            ys, cr = gap_positions(prof_rows, rows)
            xs, cc = gap_positions(prof_cols, cols)
            options.append((min(cr if rows > 1 else cc, cc if cols > 1 else cr), ys, cr, xs, cc))
        if not options:
            raise ModuleGridError(f"{path}: a {hint[0]}x{hint[1]} grid does not fit a {w}x{h} px module outline")
        _, ys, cr, xs, cc = max(options, key=lambda o: o[0])
    weakest = min(c for c, n in ((cr, len(ys) - 1), (cc, len(xs) - 1)) if n > 1) if len(ys) + len(xs) > 4 else 0.0
    if weakest < MIN_CONTRAST:
        raise ModuleGridError(f"{path}: no cell grid: the module outline was found but no regular dark gaps between cells "
                              f"(gap contrast rows {cr:.2f}, columns {cc:.2f}; a module shows at least {MIN_CONTRAST})")
    ys, xs = ys + m, xs + m
    size = (h + 2 * m, w + 2 * m)
    fine = _refined_homography(rect, ys, xs) if len(ys) > 3 and len(xs) > 3 else None
    if fine is not None:  # the grid measured cell by cell, not the outline, fixes the perspective
        rows, cols = len(ys) - 1, len(xs) - 1
        py, px = (ys[-1] - ys[0]) / rows, (xs[-1] - xs[0]) / cols
        m2 = int(np.ceil(0.5 * max(py, px) * 0.1)) + 2
        to_rect = np.array([[px, 0, m2], [0, py, m2], [0, 0, 1]], np.float64)  # ideal grid → new rectified px
        homography = to_rect @ np.linalg.inv(fine) @ homography
        homography /= homography[2, 2]
        ys, xs = m2 + py * np.arange(rows + 1), m2 + px * np.arange(cols + 1)
        size = (int(np.ceil(ys[-1])) + m2 + 1, int(np.ceil(xs[-1])) + m2 + 1)
    ys, xs = np.clip(ys, 0, size[0] - 1), np.clip(xs, 0, size[1] - 1)
    return ModuleGrid(quad=quad, homography=homography, size=size, ys=ys, xs=xs, contrast=(cr, cc),
                      image_size=(int(gray.shape[0]), int(gray.shape[1])))
