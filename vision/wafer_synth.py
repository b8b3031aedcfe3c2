"""Generated wafer maps: the nine WM-811K pattern classes on die grids of 8-inch and 12-inch wafers.

These maps are **generated**, not measured: they stand in for a fab's data where none can be
shipped (WM-811K itself is not reachable from here). A fab trains on its own maps through
:func:`vision.wafer_io.read_lswmd`.

A map is a die grid as WM-811K stores it: (H, W) uint8, 0 = off the wafer, 1 = pass die,
2 = fail die, cropped to the dies. The grid follows from the wafer (:class:`WaferSpec`: diameter,
edge exclusion, notch) and the product's die size: a die is on the wafer when all four corners lie
within the usable radius, and the grid's offset (dies centred on the wafer centre or on a street
crossing) varies by product, so one wafer size gives several map shapes, as in WM-811K.

Fail dies come from a per-die fail probability: the wafer's background yield loss (a Beta-
distributed rate, rising towards the edge, plus the odd small cluster) and the pattern's own
field, each pattern with randomised geometry and a partial fail rate inside it:

========== =====================================================================================
none       background only
Center     a disc around (near) the centre, radius 15–40 % of the wafer
Donut      an annulus around the centre, inner radius 20–45 %, clear of the edge
Edge-Loc   a patch on the rim: an arc of the edge reaching 20–45 mm in
Edge-Ring  the rim all around (or most of it), 6–18 mm deep
Loc        a blob inside the wafer, 20–50 mm across, anywhere off-centre
Near-full  nearly every die fails
Random     a high fail rate spread uniformly (15–45 %)
Scratch    a thin (one-die) straight or slightly curved track with gaps, 40–140 mm long
========== =====================================================================================

Lengths given in millimetres (edge depth, blob and scratch size) do not scale with the wafer, so
on a 12-inch wafer these patterns cover a smaller share of a larger die grid: the same product
line looks different on the two wafer sizes, which is the transfer that
``bench/wafer_transfer.py`` measures. A few thousand maps are generated per second on one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from lineside.vision.wafer_io import WM811K_CLASSES, WaferMapRecord

__all__ = [
    "WAFER_8INCH",
    "WAFER_12INCH",
    "WAFER_SPECS",
    "DieLayout",
    "WaferSpec",
    "die_layout",
    "generate_wafer_map",
    "generate_wafer_maps",
    "generated_wafer_records",
]


@dataclass(frozen=True)
class WaferSpec:
    """A wafer size and the products made on it.

    Attributes:
        name: ``"8inch"`` / ``"12inch"``.
        diameter_mm: wafer diameter.
        edge_exclusion_mm: rim where no die is placed.
        die_sizes_mm: (width, height) of the products' dies; a map uses one of them.
        background_fail: (a, b) of the Beta distribution of a wafer's background fail rate.
    """

    name: str
    diameter_mm: float
    edge_exclusion_mm: float
    die_sizes_mm: tuple[tuple[float, float], ...]
    background_fail: tuple[float, float] = (2.0, 45.0)

    @property
    def usable_radius_mm(self) -> float:
        return self.diameter_mm / 2.0 - self.edge_exclusion_mm


_DIE_SIZES = ((5.0, 5.0), (5.5, 6.5), (6.0, 6.0), (6.5, 5.0), (7.0, 7.5), (7.5, 6.0), (8.0, 8.0), (9.0, 7.0))
#: 200 mm wafer, 3 mm edge exclusion: 350–1,200 dies on 24–38 columns.
WAFER_8INCH = WaferSpec("8inch", 200.0, 3.0, _DIE_SIZES, (2.0, 45.0))
#: 300 mm wafer, 2 mm edge exclusion: 850–2,800 dies on 36–58 columns (the same products; a newer line, slightly lower background loss).
WAFER_12INCH = WaferSpec("12inch", 300.0, 2.0, _DIE_SIZES, (2.0, 60.0))
WAFER_SPECS = {s.name: s for s in (WAFER_8INCH, WAFER_12INCH)}


@dataclass(frozen=True, eq=False)
class DieLayout:
    """The dies of one product on one wafer size (cropped grid).

    Attributes:
        on_wafer: (H, W) bool, True for a die.
        x, y: (N,) die centres in mm from the wafer centre, for the N dies in row-major order.
        rows, cols: (N,) grid position of each die.
        radius_mm: usable radius (edge of the die area).
        die_mm: (width, height) of a die.
    """

    on_wafer: np.ndarray
    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    radius_mm: float
    die_mm: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.on_wafer.shape)  # type: ignore[return-value]

    @property
    def num_dies(self) -> int:
        return int(self.x.size)


@lru_cache(maxsize=256)
def die_layout(spec: WaferSpec, die_w: float, die_h: float, offset: tuple[float, float] = (0.0, 0.0)) -> DieLayout:
    """Dies of ``die_w`` x ``die_h`` mm whose four corners lie inside the usable radius, the grid shifted
    by ``offset`` (fractions of a die), cropped to the dies. A notch removes the dies at the bottom rim."""
    r = spec.usable_radius_mm
    n = int(np.ceil(2 * r / min(die_w, die_h))) + 3
    i = np.arange(n) - n // 2
    cx = (i + offset[0]) * die_w
    cy = (i + offset[1]) * die_h
    xx, yy = np.meshgrid(cx, -cy)  # row 0 at the top
    corners = [(xx + sx * die_w / 2) ** 2 + (yy + sy * die_h / 2) ** 2 for sx in (-1, 1) for sy in (-1, 1)]
    inside = np.all([c <= r * r for c in corners], axis=0)
    notch = (xx ** 2 + (yy + r) ** 2) < (1.2 * max(die_w, die_h)) ** 2
    inside &= ~notch
    rows_any, cols_any = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    inside = inside[rows_any[0]: rows_any[-1] + 1, cols_any[0]: cols_any[-1] + 1]
    xx = xx[rows_any[0]: rows_any[-1] + 1, cols_any[0]: cols_any[-1] + 1]
    yy = yy[rows_any[0]: rows_any[-1] + 1, cols_any[0]: cols_any[-1] + 1]
    rows, cols = np.nonzero(inside)
    out = DieLayout(inside, xx[rows, cols].astype(np.float32), yy[rows, cols].astype(np.float32), rows, cols, r, (die_w, die_h))
    for a in (out.on_wafer, out.x, out.y, out.rows, out.cols):
        a.setflags(write=False)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _pattern_field(cls: str, lay: DieLayout, rng: np.random.Generator) -> np.ndarray:
    """(N,) fail probability of the pattern on each die (0 outside it)."""
    R = lay.radius_mm
    x, y = lay.x / R, lay.y / R  # normalised to the usable radius
    r = np.hypot(x, y)
    pitch = float(np.mean(lay.die_mm)) / R  # one die in normalised units
    soft = max(0.5 * pitch, 0.015)
    p_in = rng.uniform(0.6, 0.95)
    if cls == "none":
        return np.zeros_like(x)
    if cls == "Center":
        cx, cy = rng.normal(0, 0.05, 2)
        rc = rng.uniform(0.15, 0.4)
        return p_in * _sigmoid((rc - np.hypot(x - cx, y - cy)) / soft)
    if cls == "Donut":
        cx, cy = rng.normal(0, 0.04, 2)
        ri = rng.uniform(0.2, 0.45)
        ro = min(ri + rng.uniform(0.12, 0.3), 0.85)
        d = np.hypot(x - cx, y - cy)
        return p_in * _sigmoid((d - ri) / soft) * _sigmoid((ro - d) / soft)
    if cls == "Edge-Loc":
        theta0 = rng.uniform(0, 2 * np.pi)
        depth = rng.uniform(20.0, 45.0) / R  # radial reach from the rim, mm → normalised
        half_arc = rng.uniform(0.25, 0.6)  # tangential half-length, normalised
        px, py = np.cos(theta0), np.sin(theta0)
        radial = 1.0 - (x * px + y * py)  # distance in from the rim along the patch axis
        tangential = -x * py + y * px
        d = np.hypot(radial / depth, tangential / half_arc)
        return p_in * _sigmoid((1.0 - d) / 0.12)
    if cls == "Edge-Ring":
        depth = rng.uniform(6.0, 18.0) / R + 0.5 * pitch
        field = rng.uniform(0.7, 0.97) * _sigmoid((r - (1.0 - depth)) / (0.5 * soft))
        cover = rng.uniform(0.75, 1.0)  # share of the rim covered
        if cover < 0.98:
            theta = np.arctan2(y, x)
            start = rng.uniform(-np.pi, np.pi)
            field = field * (((theta - start) % (2 * np.pi)) < cover * 2 * np.pi)
        return field
    if cls == "Loc":
        rho, theta = rng.uniform(0.2, 0.7), rng.uniform(0, 2 * np.pi)
        cx, cy = rho * np.cos(theta), rho * np.sin(theta)
        a, b = rng.uniform(10.0, 25.0, 2) / R  # semi-axes, mm → normalised
        phi = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
        v = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
        d = np.hypot(u / a, v / b)
        return p_in * _sigmoid((1.0 - d) / min(0.25, soft / min(a, b)))
    if cls == "Near-full":
        return np.full_like(x, rng.uniform(0.75, 0.98))
    if cls == "Random":
        return np.full_like(x, rng.uniform(0.15, 0.45))
    if cls == "Scratch":
        length = rng.uniform(40.0, 140.0) / R
        start = rng.uniform(-0.6, 0.6, 2)
        heading = rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(-1.2, 1.2)  # curvature, 1/normalised length
        t = np.linspace(0, length, 96)
        ang = heading + bend * t
        pts = start + np.stack([np.cumsum(np.cos(ang)), np.cumsum(np.sin(ang))], 1) * (length / len(t))
        d = np.sqrt(((x[:, None] - pts[None, :, 0]) ** 2 + (y[:, None] - pts[None, :, 1]) ** 2).min(1))
        width = rng.uniform(0.4, 0.8) * pitch
        on_track = d < width
        keep = rng.random(x.shape) > rng.uniform(0.0, 0.25)  # gaps along the track
        return rng.uniform(0.8, 1.0) * (on_track & keep)
    raise ValueError(f"unknown wafer pattern {cls!r}; known: {list(WM811K_CLASSES)}")


def _background(lay: DieLayout, spec: WaferSpec, rng: np.random.Generator) -> np.ndarray:
    """(N,) background fail probability: a Beta-distributed rate, higher towards the rim, plus small clusters."""
    base = rng.beta(*spec.background_fail)
    r = np.hypot(lay.x, lay.y) / lay.radius_mm
    p = base * (1.0 + rng.uniform(0.0, 2.5) * r ** 6)
    for _ in range(rng.poisson(1.0)):  # a particle or two: 1–4 neighbouring dies
        k = rng.integers(lay.num_dies)
        d = np.hypot(lay.x - lay.x[k], lay.y - lay.y[k]) / max(lay.die_mm)
        p = np.maximum(p, 0.9 * (d < rng.uniform(0.5, 1.6)))
    return p


def _class_name(pattern: int | str) -> str:
    if isinstance(pattern, (int, np.integer)):
        return WM811K_CLASSES[int(pattern)]
    if pattern not in WM811K_CLASSES:
        raise ValueError(f"unknown wafer pattern {pattern!r}; known: {list(WM811K_CLASSES)}")
    return pattern


def generate_wafer_map(pattern: int | str, spec: WaferSpec | str, rng: np.random.Generator) -> np.ndarray:
    """One generated map of ``pattern`` (class index or name) on a random product of ``spec``.

    Returns (H, W) uint8: 0 off the wafer, 1 pass, 2 fail.
    """
    spec = WAFER_SPECS[spec] if isinstance(spec, str) else spec
    die_w, die_h = spec.die_sizes_mm[rng.integers(len(spec.die_sizes_mm))]
    offset = (0.5 * rng.integers(2), 0.5 * rng.integers(2))
    lay = die_layout(spec, die_w, die_h, offset)
    field = _pattern_field(_class_name(pattern), lay, rng)
    back = _background(lay, spec, rng)
    p_fail = 1.0 - (1.0 - field) * (1.0 - back)
    fail = rng.random(lay.num_dies) < p_fail
    out = lay.on_wafer.astype(np.uint8)
    out[lay.rows, lay.cols] = 1 + fail.astype(np.uint8)
    return out


def generate_wafer_maps(
    n: int,
    spec: WaferSpec | str,
    seed: int = 0,
    class_probs: Sequence[float] | None = None,
    labels: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` generated maps and their class indices (into :data:`WM811K_CLASSES`), seeded.

    Args:
        n: how many maps (ignored when ``labels`` is given).
        spec: ``WAFER_8INCH`` / ``WAFER_12INCH`` or their names.
        seed: the same seed gives the same maps.
        class_probs: share of each of the nine classes (default: equal); labels are drawn from it.
        labels: the classes to generate, one map each (overrides ``n`` and ``class_probs``).
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        p = np.full(len(WM811K_CLASSES), 1.0 / len(WM811K_CLASSES)) if class_probs is None else np.asarray(class_probs, float)
        if p.shape != (len(WM811K_CLASSES),) or p.min() < 0 or p.sum() <= 0:
            raise ValueError(f"class_probs needs {len(WM811K_CLASSES)} non-negative shares, got {class_probs}")
        labels = rng.choice(len(WM811K_CLASSES), size=n, p=p / p.sum())
    labels = np.asarray(labels, dtype=np.int64)
    return [generate_wafer_map(int(k), spec, rng) for k in labels], labels


def generated_wafer_records(
    n: int,
    spec: WaferSpec | str,
    seed: int = 0,
    class_probs: Sequence[float] | None = None,
    labels: Sequence[int] | None = None,
    split: str | None = None,
    unlabelled: bool = False,
) -> list[WaferMapRecord]:
    """:func:`generate_wafer_maps` as :class:`WaferMapRecord` s (``label`` -1 when ``unlabelled``)."""
    name = spec if isinstance(spec, str) else spec.name
    maps, ys = generate_wafer_maps(n, spec, seed, class_probs, labels)
    return [WaferMapRecord(m, -1 if unlabelled else int(y), split, f"generated-{name}-seed{seed}", i, f"generated:{name}:{seed}#{i}")
            for i, (m, y) in enumerate(zip(maps, ys))]
