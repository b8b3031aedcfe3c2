"""Point-cloud preprocessing with open3d: workspace crop, statistical outlier removal, voxel
downsampling, normals, centre-and-scale with its inverse, fixed-size sampling with a mask.

Every step takes and returns a :class:`~.io.PointCloud` (``points (N, 3)`` in metres) except
:func:`normalize` (also returns the :class:`NormalizeTransform` that maps model outputs back to
sensor coordinates) and :func:`sample_fixed` (returns padded ``(P, 3)`` arrays and a ``(P,)``
mask for batching). :func:`preprocess_cloud` chains them as a dataset would.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import open3d as o3d

from .io import PointCloud

__all__ = [
    "CloudUnitsWarning",
    "NormalizeTransform",
    "PreprocessedCloud",
    "check_metres",
    "crop_to_box",
    "estimate_normals",
    "normalize",
    "preprocess_cloud",
    "remove_statistical_outliers",
    "sample_fixed",
    "voxel_downsample",
]


class CloudUnitsWarning(UserWarning):
    """A cloud whose extent suggests millimetres where metres are expected."""


def _name(cloud: PointCloud) -> str:
    return cloud.source or "<point cloud>"


def check_metres(cloud: PointCloud, max_extent: float = 10.0, strict: bool = False) -> float:
    """Check that a cloud is in metres: an extent above ``max_extent`` (m) is most likely millimetres.

    Returns the largest bounding-box extent. Warns (:class:`CloudUnitsWarning`), or raises
    ValueError when ``strict``, suggesting ``read_point_cloud(..., scale=0.001)``.
    """
    extent = float(np.ptp(cloud.points, axis=0).max()) if len(cloud) else 0.0
    if extent > max_extent:
        msg = (
            f"{_name(cloud)}: the cloud spans {extent:.4g} units, more than {max_extent} m; it looks like millimetres "
            "where metres are expected (read it with scale=0.001)"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, CloudUnitsWarning, stacklevel=2)
    return extent


def crop_to_box(cloud: PointCloud, min_bound, max_bound) -> PointCloud:
    """Keep the points inside the axis-aligned workspace box ``[min_bound, max_bound]`` (3 values each, m)."""
    lo, hi = np.asarray(min_bound, dtype=np.float64), np.asarray(max_bound, dtype=np.float64)
    if lo.shape != (3,) or hi.shape != (3,) or (lo > hi).any():
        raise ValueError(f"workspace box needs min_bound <= max_bound, 3 values each; got {lo} and {hi}")
    keep = ((cloud.points >= lo) & (cloud.points <= hi)).all(axis=1)
    if not keep.any():
        raise ValueError(
            f"{_name(cloud)}: no point left after cropping to the workspace box {lo.tolist()} .. {hi.tolist()} "
            f"(cloud spans {cloud.points.min(0).round(4).tolist()} .. {cloud.points.max(0).round(4).tolist()}; wrong units or frame?)"
        )
    return cloud.select(keep)


def remove_statistical_outliers(cloud: PointCloud, nb_neighbors: int = 20, std_ratio: float = 2.0) -> PointCloud:
    """Drop points whose mean distance to ``nb_neighbors`` neighbours is above mean + ``std_ratio`` std (open3d)."""
    if len(cloud) <= nb_neighbors:
        return cloud
    _, index = cloud.to_open3d().remove_statistical_outlier(nb_neighbors=nb_neighbors, std_ratio=std_ratio)
    return cloud.select(np.asarray(index, dtype=np.int64))


def voxel_downsample(cloud: PointCloud, voxel_size: float) -> PointCloud:
    """Average the points (normals, colours) in each ``voxel_size`` cube (open3d)."""
    if voxel_size <= 0:
        return cloud
    out = PointCloud.from_open3d(cloud.to_open3d().voxel_down_sample(voxel_size), cloud.source)
    out.dropped_nonfinite = cloud.dropped_nonfinite
    return out


def estimate_normals(cloud: PointCloud, radius: float = 0.01, max_nn: int = 30, camera_location=(0.0, 0.0, 0.0)) -> PointCloud:
    """Estimate unit normals from ``max_nn`` neighbours within ``radius`` (m), oriented toward the camera (open3d)."""
    pcd = cloud.to_open3d()
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    if camera_location is not None:
        pcd.orient_normals_towards_camera_location(np.asarray(camera_location, dtype=np.float64))
    out = PointCloud(cloud.points, np.asarray(pcd.normals).copy(), cloud.colors, cloud.source, cloud.dropped_nonfinite)
    return out


@dataclass(frozen=True)
class NormalizeTransform:
    """``normalized = (sensor - center) / scale``; :meth:`to_sensor` undoes it.

    Attributes:
        center: ``(3,)`` the cloud's centroid in sensor coordinates (m).
        scale: the largest distance from ``center`` to a point (m): normalized clouds fit in the unit ball.
    """

    center: np.ndarray
    scale: float

    def to_normalized(self, points: np.ndarray) -> np.ndarray:
        """``(..., 3)`` sensor metres → ``(..., 3)`` normalized."""
        return (np.asarray(points) - self.center) / self.scale

    def to_sensor(self, points: np.ndarray) -> np.ndarray:
        """``(..., 3)`` normalized positions → ``(..., 3)`` sensor metres."""
        return np.asarray(points) * self.scale + self.center

    def length_to_sensor(self, length):
        """A length (e.g. a gripper width) in normalized units → metres. Directions need no mapping."""
        return np.asarray(length) * self.scale


def normalize(cloud: PointCloud) -> tuple[PointCloud, NormalizeTransform]:
    """Centre on the centroid and scale into the unit ball; returns the cloud and its transform."""
    center = cloud.points.mean(axis=0)
    scale = float(np.linalg.norm(cloud.points - center, axis=1).max())
    if scale <= 0:
        scale = 1.0
    t = NormalizeTransform(center, scale)
    out = PointCloud(t.to_normalized(cloud.points), cloud.normals, cloud.colors, cloud.source, cloud.dropped_nonfinite)
    return out, t


def sample_fixed(
    points: np.ndarray, num_points: int, features: np.ndarray | None = None, rng: np.random.Generator | int | None = 0
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Sample (without replacement) or zero-pad to exactly ``num_points`` rows for batching.

    Args:
        points: ``(N, 3)``.
        num_points: ``P``.
        features: optional ``(N, F)`` per-point features (normals, colours) taken along.
        rng: seed or generator for the subset.

    Returns:
        ``points (P, 3)`` float32, ``features (P, F)`` float32 or None, ``mask (P,)`` bool (True =
        real point; padding rows are zeros at the end), ``index (P,)`` int64 source rows (-1 for padding).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = int(points.shape[0])
    if n >= num_points:
        index = np.sort(rng.choice(n, num_points, replace=False))
    else:
        index = np.concatenate([np.arange(n), np.full(num_points - n, -1)])
    mask = index >= 0
    out = np.zeros((num_points, 3), np.float32)
    out[mask] = points[index[mask]]
    feats = None
    if features is not None:
        feats = np.zeros((num_points, features.shape[1]), np.float32)
        feats[mask] = features[index[mask]]
    return out, feats, mask, index.astype(np.int64)


@dataclass
class PreprocessedCloud:
    """A model-ready cloud.

    Attributes:
        points: ``(P, 3)`` float32 normalized positions (zeros where padded).
        normals: ``(P, 3)`` float32 unit normals (zeros where padded).
        mask: ``(P,)`` bool, True for real points.
        transform: maps normalized positions back to sensor metres.
    """

    points: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    transform: NormalizeTransform


def preprocess_cloud(
    cloud: PointCloud,
    num_points: int = 1024,
    *,
    workspace: tuple | None = None,
    voxel_size: float = 0.002,
    outlier_neighbors: int = 20,
    outlier_std: float = 2.0,
    normal_radius: float = 0.01,
    min_points: int = 32,
    max_extent: float = 10.0,
    rng: np.random.Generator | int | None = 0,
) -> PreprocessedCloud:
    """Crop (``workspace=(min_bound, max_bound)``) → outliers → voxel → normals → normalize → ``P`` points.

    Raises ValueError naming the file when nothing is left after cropping, fewer than
    ``min_points`` remain, or the extent says millimetres (> ``max_extent``).
    """
    check_metres(cloud, max_extent, strict=True)
    if workspace is not None:
        cloud = crop_to_box(cloud, *workspace)
    if outlier_neighbors > 0:
        cloud = remove_statistical_outliers(cloud, outlier_neighbors, outlier_std)
    cloud = voxel_downsample(cloud, voxel_size)
    if len(cloud) < min_points:
        raise ValueError(f"{_name(cloud)}: only {len(cloud)} points left after preprocessing, fewer than {min_points}")
    if cloud.normals is None:
        cloud = estimate_normals(cloud, normal_radius)
    cloud, transform = normalize(cloud)
    pts, normals, mask, _ = sample_fixed(cloud.points, num_points, cloud.normals, rng)
    return PreprocessedCloud(pts, normals, mask, transform)
