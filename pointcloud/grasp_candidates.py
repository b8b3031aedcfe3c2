"""Grasp candidates on an observed cloud and what a scorer sees of each: the first half of a
candidate-then-score grasp planner (in the style of GPD: sample with a physics prior, learn the choice).

:func:`grasp_candidates` pools the two model-free samplers of :mod:`.grasp_dataset` before their
non-maximum suppression, and widens them:

* **antipodal** (source 0): the pairs of :func:`~.grasp_dataset.analytic_grasp_baseline` (observed
  points whose normals both lie in the friction cone of the line joining them), each with the camera
  ray as approach and that approach tilted about the closing axis by ``approach_tilts``;
* **slab** (source 1): the top-down grasps of :func:`~.grasp_dataset.slab_grasp_baseline` (approach
  along ``-normal``, closing across the narrowest local extent) at several closing-axis yaws about
  the approach (``slab_yaws``) and finger depths (``slab_depths``).

Every candidate gets its width and centre from the cloud, as the baselines do (the extent of the
observed points in the pads' footprint + :data:`~.grasp_dataset.VOXEL_EDGE`; ``position`` the middle
of that extent), so the strict check (:func:`~.grasp_labels.evaluate_grasps_strict`) judges each
candidate as it would be executed. Near-duplicates (centre within ``dedupe_distance``, axes within
~10°) are dropped.

:func:`candidate_crops` gives each candidate's local cloud in its gripper frame (x = closing,
y = approach × closing, z = approach, origin = the point midway between the jaws): a fixed number of
the observed points inside a box around the gripper, positions / :data:`CROP_HALF_EXTENT`, normals,
and each point's distance outside the predicted jaws. :func:`candidate_features` gives a few scalars
per candidate (width, approach vs the camera ray, source, the sampler's own score, counts of observed
points between the pads / in the fingers' and palm's paths, contact normals vs the closing axis …).

Clouds are in the sensor frame (metres, camera at the origin, normals toward the camera), as
:func:`~.preprocess.preprocess_cloud` and the grasp datasets give them. This module imports nothing
from ``fusion``; the scorer itself is :class:`lineside.fusion.grasp_ranker.GraspRanker`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .grasp_dataset import PAD_EXTENT_MARGIN, VOXEL_EDGE, _pad_extent, antipodal_partners, camera_approach
from .grasp_labels import (
    GRASP_DIM,
    STRICT_CLEARANCE,
    STRICT_STANDOFF,
    ParallelJawGripper,
    make_grasps,
)

__all__ = [
    "CROP_CHANNELS",
    "CROP_HALF_EXTENT",
    "FEATURE_NAMES",
    "SOURCE_ANTIPODAL",
    "SOURCE_SLAB",
    "CandidateConfig",
    "GraspCandidates",
    "candidate_crops",
    "candidate_features",
    "check_cloud",
    "grasp_candidates",
]

SOURCE_ANTIPODAL, SOURCE_SLAB = 0, 1
#: half-size (m) of the crop box in the gripper frame (x, y, z); crop positions are divided by it
CROP_HALF_EXTENT = np.array([0.06, 0.03, 0.05])
#: per-point crop channels: position (3, / CROP_HALF_EXTENT), normal (3), outside-the-jaws distance (1, / 1 cm)
CROP_CHANNELS = 7
FEATURE_NAMES = (
    "width",            # predicted jaw width / max_width
    "approach_cos",     # approach · camera ray to the centre (1 = straight away from the camera)
    "source_antipodal",
    "source_slab",
    "prior",            # the sampler's own score (friction margin, or slab score)
    "n_crop",           # log1p(observed points in the crop box) / 6
    "n_between",        # log1p(points between the pads, inside the finger footprint) / 6
    "n_finger_path",    # log1p(points in the volume the fingers sweep from the stand-off) / 3
    "n_palm_path",      # log1p(points in the palm's path) / 3
    "centre_offset",    # |mean x of the points between the pads| / (width / 2)
    "contact_cos_pos",  # mean |normal · closing| of the points at the +x edge between the pads
    "contact_cos_neg",  # same at the -x edge
    "depth_in",         # extent along the approach of the points between the pads / finger_depth
    "nearest",          # distance of the centre to the nearest observed point / 1 cm (clipped at 5)
)


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates :func:`grasp_candidates` draws (metres, degrees).

    Attributes:
        num_antipodal_seeds: observed points tried as first contacts of antipodal pairs.
        pairs_per_seed: best pairs kept per seed (by friction margin).
        approach_tilts: tilts (deg) of the antipodal approach about the closing axis, besides 0.
        num_slab_seeds: observed points tried as slab-grasp centres.
        slab_yaws: closing-axis yaws (deg) about the approach relative to the narrowest direction.
        slab_depths: finger depths (m) tried besides the slab rule's own (half the local extent).
        mu: friction coefficient of the antipodal test.
        dedupe_distance: candidates with centres closer than this (and axes within ~10°) are merged.
        max_candidates: keep at most this many (best sampler score first, sources interleaved).
    """

    num_antipodal_seeds: int = 300
    pairs_per_seed: int = 2
    approach_tilts: tuple = (-30.0, 30.0)
    num_slab_seeds: int = 120
    slab_yaws: tuple = (0.0, 30.0, -30.0, 90.0)
    slab_depths: tuple = (0.015,)
    mu: float = 0.5
    dedupe_distance: float = 0.004
    max_candidates: int = 256


class GraspCandidates(dict):
    """``grasps`` (G, 11) float32 sensor-frame grasps (score column = the sampler's own score) and
    ``source`` (G,) int64 (:data:`SOURCE_ANTIPODAL` / :data:`SOURCE_SLAB`)."""

    @property
    def grasps(self) -> np.ndarray:
        return self["grasps"]

    @property
    def source(self) -> np.ndarray:
        return self["source"]

    def __len__(self) -> int:  # number of candidates, not of keys
        return len(self["grasps"])


def check_cloud(points: np.ndarray, normals: np.ndarray | None = None, min_points: int = 8, name: str = "cloud") -> tuple[np.ndarray, np.ndarray | None]:
    """Validate an observed cloud: (N, 3) finite metres with N >= ``min_points``; normals (N, 3) when given.
    Raises ``ValueError`` saying what is wrong."""
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{name}: points must be (N, 3), got shape {pts.shape}")
    if len(pts) == 0:
        raise ValueError(f"{name}: the cloud is empty")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name}: {int((~np.isfinite(pts)).any(1).sum())} of {len(pts)} points are NaN/inf")
    if len(pts) < min_points:
        raise ValueError(f"{name}: {len(pts)} points, at least {min_points} needed for grasp candidates")
    if np.ptp(pts, axis=0).max() < 1e-4:
        raise ValueError(f"{name}: degenerate cloud (all {len(pts)} points within 0.1 mm)")
    nrm = None
    if normals is not None:
        nrm = np.asarray(normals, np.float64)
        if nrm.shape != pts.shape:
            raise ValueError(f"{name}: normals have shape {nrm.shape}, points {pts.shape}")
        if not np.isfinite(nrm).all():
            raise ValueError(f"{name}: normals contain NaN/inf")
    return pts, nrm


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _rotate(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about unit ``axis`` by ``deg`` degrees."""
    t = np.deg2rad(deg)
    return v * np.cos(t) + np.cross(axis, v) * np.sin(t) + axis * (axis @ v) * (1 - np.cos(t))


def _antipodal(pts, nrm, tree, rng, cfg: CandidateConfig, gripper: ParallelJawGripper) -> list[tuple]:
    cos_cone = np.cos(np.arctan(cfg.mu))
    out = []
    for i in rng.choice(len(pts), min(cfg.num_antipodal_seeds, len(pts)), replace=False):
        found = antipodal_partners(pts, nrm, tree, int(i), cos_cone, gripper)
        if found is None:
            continue
        nbr, w, c, s = found
        for j in np.argsort(-s)[: cfg.pairs_per_seed]:
            if s[j] < 0:
                break
            centre = (pts[i] + pts[nbr[j]]) / 2
            a = camera_approach(centre, c[j])
            if a is None:
                continue
            for tilt in (0.0, *cfg.approach_tilts):
                at = _unit(_rotate(a, c[j], tilt))
                pos, width = _pad_extent(pts, tree, centre, at, c[j], w[j], w[j] / 2 + PAD_EXTENT_MARGIN, gripper)
                out.append((float(s[j]), pos, at, c[j], width, SOURCE_ANTIPODAL))
    return out


def _slab(pts, nrm, tree, rng, cfg: CandidateConfig, gripper: ParallelJawGripper) -> list[tuple]:
    out = []
    for i in rng.choice(len(pts), min(cfg.num_slab_seeds, len(pts)), replace=False):
        a = -nrm[i] / max(np.linalg.norm(nrm[i]), 1e-9)
        nbr = np.asarray(tree.query_ball_point(pts[i], gripper.max_width), np.int64)
        d = pts[nbr] - pts[i]
        along = d @ a
        radial = d - along[:, None] * a
        inside = np.linalg.norm(radial, axis=1) <= gripper.max_width / 2
        if inside.sum() < 5:
            continue
        r, al = radial[inside], along[inside]
        e1 = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(a, e1)
        _, vecs = np.linalg.eigh(np.cov(np.c_[r @ e1, r @ e2].T) + 1e-12 * np.eye(2))
        minor = vecs[0, 0] * e1 + vecs[1, 0] * e2
        ray = pts[i] / max(np.linalg.norm(pts[i]), 1e-9)
        for yaw in cfg.slab_yaws:
            c = _unit(_rotate(minor, a, yaw))
            slab = np.abs(r @ np.cross(a, c)) <= gripper.finger_width / 2
            if slab.sum() < 3:
                continue
            xs = r[slab] @ c
            width = xs.max() - xs.min() + VOXEL_EDGE
            if width > gripper.max_width:
                continue
            own = np.clip((al[slab].max() - al[slab].min()) / 2, 0.003, gripper.finger_depth - gripper.tip_margin)
            score = (1 - width / gripper.max_width) * abs(a @ ray)
            for depth in (own, *cfg.slab_depths):
                depth = float(np.clip(depth, 0.003, gripper.finger_depth - gripper.tip_margin))
                centre = pts[i] + (xs.max() + xs.min()) / 2 * c + depth * a
                out.append((float(score), centre, a, c, float(width), SOURCE_SLAB))
    return out


def _dedupe(cands: list[tuple], distance: float, limit: int) -> list[tuple]:
    """Greedy, best sampler score first within each source, sources interleaved: drop a candidate whose
    centre lies within ``distance`` of a kept one with approach and closing axes within ~10°."""
    by_source = [sorted([c for c in cands if c[5] == s], key=lambda t: -t[0]) for s in (SOURCE_ANTIPODAL, SOURCE_SLAB)]
    order: list[tuple] = []
    ia = ib = 0
    while ia < len(by_source[0]) or ib < len(by_source[1]):
        if ia < len(by_source[0]):
            order.append(by_source[0][ia])
            ia += 1
        if ib < len(by_source[1]):
            order.append(by_source[1][ib])
            ib += 1
    kept: list[tuple] = []
    centres = np.zeros((0, 3))
    axes = np.zeros((0, 6))
    for cand in order:
        if len(kept):
            near = np.linalg.norm(centres - cand[1], axis=1) < distance
            if near.any():
                same = (axes[near, :3] @ cand[2] > 0.985) & (np.abs(axes[near, 3:] @ cand[3]) > 0.985)
                if same.any():
                    continue
        kept.append(cand)
        centres = np.vstack([centres, cand[1]])
        axes = np.vstack([axes, np.r_[cand[2], cand[3]]])
        if len(kept) >= limit:
            break
    return kept


def grasp_candidates(
    points: np.ndarray,
    normals: np.ndarray,
    gripper: ParallelJawGripper = ParallelJawGripper(),
    config: CandidateConfig = CandidateConfig(),
    rng: np.random.Generator | int | None = 0,
) -> GraspCandidates:
    """Antipodal and slab grasp candidates on an observed cloud, each with the width the cloud shows.

    Args:
        points, normals: (N, 3) sensor-frame points (m, camera at the origin) and unit normals toward the camera.
        gripper: the gripper geometry. config: :class:`CandidateConfig`. rng: seed or generator.

    Returns:
        :class:`GraspCandidates` (``grasps`` (G, 11) float32, ``source`` (G,) int64), G <= ``config.max_candidates``;
        G may be 0 when the cloud offers no antipodal pair and no slab narrower than ``max_width``.

    Raises:
        ValueError: an empty, non-finite, degenerate or too small cloud, or normals of the wrong shape.
    """
    pts, nrm = check_cloud(points, normals)
    if nrm is None:
        raise ValueError("cloud: grasp candidates need normals (estimate them with preprocess_cloud)")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    tree = cKDTree(pts)
    cands = _antipodal(pts, nrm, tree, rng, config, gripper) + _slab(pts, nrm, tree, rng, config, gripper)
    cands = [c for c in cands if 0 < c[4] <= gripper.max_width]
    kept = _dedupe(cands, config.dedupe_distance, config.max_candidates)
    if not kept:
        return GraspCandidates(grasps=np.zeros((0, GRASP_DIM), np.float32), source=np.zeros(0, np.int64))
    g = make_grasps([c[1] for c in kept], [c[2] for c in kept], [c[3] for c in kept], [c[4] for c in kept], [c[0] for c in kept])
    return GraspCandidates(grasps=g, source=np.array([c[5] for c in kept], np.int64))


def _local(points: np.ndarray, normals: np.ndarray, grasps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) points / normals → (G, N, 3) coordinates and normals in each grasp's gripper frame."""
    g = np.asarray(grasps, np.float64)
    z = _unit(g[:, 3:6])
    x = _unit(g[:, 6:9] - (g[:, 6:9] * z).sum(1, keepdims=True) * z)
    y = np.cross(z, x)
    rot = np.stack([x, y, z], 1)  # (G, 3, 3) rows = local axes
    d = points[None] - g[:, None, 0:3]
    return np.einsum("gij,gnj->gni", rot, d), np.einsum("gij,nj->gni", rot, normals)


def candidate_crops(points: np.ndarray, normals: np.ndarray, grasps: np.ndarray, num_points: int = 128,
                    gripper: ParallelJawGripper = ParallelJawGripper(), clearance: float = STRICT_CLEARANCE,
                    rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Each candidate's local cloud in its gripper frame: (G, num_points, :data:`CROP_CHANNELS`) float32.

    The observed points inside the box ``|local| <= CROP_HALF_EXTENT`` (x = closing, y = approach ×
    closing, z = approach; origin = the point midway between the jaws) are sampled to ``num_points``
    (seeded; repeated when fewer, all zeros when none). Channels: local position / ``CROP_HALF_EXTENT``,
    the normal in the gripper frame, and ``(|x| - opening / 2) / 1 cm`` (> 0 outside the open jaws,
    opening = width + ``clearance``)."""
    pts, nrm = check_cloud(points, normals)
    g = np.asarray(grasps, np.float64).reshape(-1, GRASP_DIM)
    out = np.zeros((len(g), num_points, CROP_CHANNELS), np.float32)
    if len(g) == 0:
        return out
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    local, lnrm = _local(pts, nrm, g)
    inside = (np.abs(local) <= CROP_HALF_EXTENT).all(-1)  # (G, N)
    keys = np.where(inside, rng.random(inside.shape), np.inf)
    order = np.argsort(keys, axis=1)
    count = inside.sum(1)
    slot = np.arange(num_points)[None, :]
    pick = np.take_along_axis(order, slot % np.maximum(count, 1)[:, None], 1)  # wrap around the chosen points
    rows = np.arange(len(g))[:, None]
    half_open = np.minimum(g[:, 9] + clearance, gripper.max_width)[:, None] / 2
    lp, ln = local[rows, pick], lnrm[rows, pick]
    feats = np.concatenate([lp / CROP_HALF_EXTENT, ln, ((np.abs(lp[..., 0]) - half_open) / 0.01)[..., None]], -1)
    out[:] = np.where((count > 0)[:, None, None], feats, 0.0)
    return out


def candidate_features(points: np.ndarray, normals: np.ndarray, grasps: np.ndarray, source: np.ndarray,
                       gripper: ParallelJawGripper = ParallelJawGripper(), clearance: float = STRICT_CLEARANCE,
                       standoff: float = STRICT_STANDOFF) -> np.ndarray:
    """Scalar features per candidate: (G, len(:data:`FEATURE_NAMES`)) float32 (meaning in ``FEATURE_NAMES``)."""
    pts, nrm = check_cloud(points, normals)
    g = np.asarray(grasps, np.float64).reshape(-1, GRASP_DIM)
    source = np.asarray(source, np.int64).reshape(-1)
    if len(source) != len(g):
        raise ValueError(f"candidate_features: {len(g)} grasps but {len(source)} source flags")
    feats = np.zeros((len(g), len(FEATURE_NAMES)), np.float32)
    if len(g) == 0:
        return feats
    local, lnrm = _local(pts, nrm, g)
    lx, ly, lz = local[..., 0], local[..., 1], local[..., 2]
    w = g[:, 9]
    h = (np.minimum(w + clearance, gripper.max_width) / 2)[:, None]
    in_y = np.abs(ly) <= gripper.finger_width / 2
    z_lo, z_hi = gripper.tip_margin - gripper.finger_depth, gripper.tip_margin
    crop = (np.abs(local) <= CROP_HALF_EXTENT).all(-1)
    between = in_y & (np.abs(lx) <= h) & (lz >= z_lo) & (lz <= z_hi)
    finger = in_y & (np.abs(lx) > h) & (np.abs(lx) <= h + gripper.finger_thickness) & (lz <= z_hi) & (lz >= z_lo - standoff)
    palm = in_y & (np.abs(lx) <= h + gripper.finger_thickness) & (lz < z_lo) & (lz >= z_lo - gripper.palm_thickness - standoff)
    nb = between.sum(1)
    xs = np.where(between, lx, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no point between the pads
        mean_x = np.nan_to_num(np.nanmean(xs, 1))
        hi, lo = np.nan_to_num(np.nanmax(xs, 1)), np.nan_to_num(np.nanmin(xs, 1))
        edge_pos = between & (lx >= hi[:, None] - 0.002)
        edge_neg = between & (lx <= lo[:, None] + 0.002)
        ncos = np.abs(lnrm[..., 0])
        cos_pos = np.nan_to_num(np.nanmean(np.where(edge_pos, ncos, np.nan), 1))
        cos_neg = np.nan_to_num(np.nanmean(np.where(edge_neg, ncos, np.nan), 1))
        zs = np.where(between, lz, np.nan)
        depth = np.nan_to_num(np.nanmax(zs, 1) - np.nanmin(zs, 1))
    ray = _unit(g[:, 0:3])
    nearest = np.linalg.norm(local, axis=-1).min(1)
    feats[:, 0] = w / gripper.max_width
    feats[:, 1] = (_unit(g[:, 3:6]) * ray).sum(1)
    feats[:, 2] = source == SOURCE_ANTIPODAL
    feats[:, 3] = source == SOURCE_SLAB
    feats[:, 4] = g[:, 10]
    feats[:, 5] = np.log1p(crop.sum(1)) / 6
    feats[:, 6] = np.log1p(nb) / 6
    feats[:, 7] = np.log1p(finger.sum(1)) / 3
    feats[:, 8] = np.log1p(palm.sum(1)) / 3
    feats[:, 9] = np.abs(mean_x) / np.maximum(w / 2, 1e-4)
    feats[:, 10] = cos_pos
    feats[:, 11] = cos_neg
    feats[:, 12] = depth / gripper.finger_depth
    feats[:, 13] = np.minimum(nearest / 0.01, 5.0)
    return feats
