"""Point-cloud reading: cloud files (.ply, .pcd, .xyz, .npy) and depth images with pinhole
intrinsics, with errors that name the file and say what was wrong.

A cloud is held as a :class:`PointCloud` of numpy arrays (points ``(N, 3)`` float64 in the
file's units, metres for depth cameras; optional normals ``(N, 3)`` and colours ``(N, 3)``
in 0-1); ``to_open3d()`` hands it to the preprocessing in :mod:`.preprocess`.

Intrinsics JSON (``read_intrinsics``), either this package's small format::

    {"width": 640, "height": 480, "fx": 615.0, "fy": 615.0, "cx": 320.0, "cy": 240.0,
     "depth_scale": 1000.0}      # optional: raw depth units per metre for integer images

or open3d's ``PinholeCameraIntrinsic`` JSON (``{"width", "height", "intrinsic_matrix":
[9 numbers, column-major]}``). Depth images: 16-bit PNG/TIFF in millimetres (divided by
``depth_scale``, default 1000), or float32 ``.npy``/``.tiff`` in metres. Zero, negative and
non-finite depths are invalid pixels (no return), as depth cameras deliver them.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open3d as o3d

__all__ = [
    "CLOUD_EXTENSIONS",
    "CameraIntrinsics",
    "PointCloud",
    "PointCloudReadError",
    "depth_to_point_cloud",
    "read_depth_image",
    "read_intrinsics",
    "read_point_cloud",
    "read_rgbd",
]

CLOUD_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".npy")
DEPTH_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")


class PointCloudReadError(ValueError):
    """A cloud, depth image or intrinsics file could not be used; the message starts with the path."""


@dataclass
class PointCloud:
    """A point cloud as numpy arrays.

    Attributes:
        points: ``(N, 3)`` float64 xyz.
        normals: ``(N, 3)`` float64 unit normals, or None.
        colors: ``(N, 3)`` float64 RGB in 0-1, or None.
        source: the file it came from ('' when built in memory).
        dropped_nonfinite: how many NaN/inf points were dropped on reading.
    """

    points: np.ndarray
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None
    source: str = ""
    dropped_nonfinite: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def select(self, index: np.ndarray) -> "PointCloud":
        """The subset ``index`` (a boolean mask ``(N,)`` or integer indices) with the same fields."""
        return PointCloud(
            self.points[index],
            None if self.normals is None else self.normals[index],
            None if self.colors is None else self.colors[index],
            self.source,
            self.dropped_nonfinite,
            dict(self.extra),
        )

    def to_open3d(self) -> o3d.geometry.PointCloud:
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(self.points, dtype=np.float64)))
        if self.normals is not None:
            pcd.normals = o3d.utility.Vector3dVector(np.ascontiguousarray(self.normals, dtype=np.float64))
        if self.colors is not None:
            pcd.colors = o3d.utility.Vector3dVector(np.ascontiguousarray(self.colors, dtype=np.float64))
        return pcd

    @classmethod
    def from_open3d(cls, pcd: o3d.geometry.PointCloud, source: str = "") -> "PointCloud":
        return cls(
            np.asarray(pcd.points, dtype=np.float64).copy(),
            np.asarray(pcd.normals, dtype=np.float64).copy() if pcd.has_normals() else None,
            np.asarray(pcd.colors, dtype=np.float64).copy() if pcd.has_colors() else None,
            source,
        )


def _checked(cloud: PointCloud, name: str) -> PointCloud:
    """Drop non-finite points (warning with the count); error on an empty result."""
    n = len(cloud)
    if n == 0:
        raise PointCloudReadError(f"{name}: the point cloud is empty (0 points)")
    ok = np.isfinite(cloud.points).all(axis=1)
    if cloud.normals is not None:
        bad_normals = ~np.isfinite(cloud.normals).all(axis=1)
        if bad_normals.any():  # a point with a NaN normal keeps its position; its normal becomes unusable
            cloud.normals = None
    dropped = int(n - ok.sum())
    if dropped:
        if dropped == n:
            raise PointCloudReadError(f"{name}: all {n} points are NaN or infinite; nothing left to use")
        warnings.warn(f"{name}: dropped {dropped} of {n} points with NaN or infinite coordinates", stacklevel=3)
        cloud = cloud.select(ok)
        cloud.dropped_nonfinite = dropped
    if cloud.colors is not None:
        cloud.colors = np.clip(np.nan_to_num(cloud.colors), 0.0, 1.0)
    return cloud


def _split_columns(array: np.ndarray, name: str, extra: str) -> PointCloud:
    """(N, 3) xyz, (N, 6) xyz + normals or colours, (N, 9) xyz + normals + colours."""
    if array.ndim != 2 or array.shape[1] not in (3, 6, 9):
        raise PointCloudReadError(f"{name}: expected an (N, 3), (N, 6) or (N, 9) array, got shape {tuple(array.shape)}")
    array = array.astype(np.float64, copy=False)
    points, normals, colors = array[:, :3], None, None
    if array.shape[1] == 9:
        normals, colors = array[:, 3:6], array[:, 6:9]
    elif array.shape[1] == 6:
        cols = array[:, 3:6]
        kind = extra
        if kind == "auto":
            finite = cols[np.isfinite(cols).all(axis=1)]
            norms = np.linalg.norm(finite, axis=1)
            if finite.size and np.allclose(norms, 1.0, atol=1e-2):
                kind = "normals"
            elif finite.size and finite.min() >= 0.0 and finite.max() <= 255.0:
                kind = "colors"
            else:
                raise PointCloudReadError(
                    f"{name}: columns 4-6 are neither unit normals nor colours (0-1 or 0-255); pass extra='normals' or 'colors'"
                )
        if kind == "normals":
            normals = cols
        elif kind == "colors":
            colors = cols / 255.0 if np.nanmax(cols) > 1.0 else cols
        else:
            raise ValueError(f"extra must be 'auto', 'normals' or 'colors', got {extra!r}")
    if array.shape[1] == 9 and colors is not None and np.nanmax(colors) > 1.0:
        colors = colors / 255.0
    return PointCloud(points, normals, colors, name)


_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
              "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def _ply_truncation(path: Path) -> str:
    """Why a PLY file holds fewer vertices than its header declares ('' when it holds them all or cannot tell).

    open3d's reader fills vertices missing from a truncated file with uninitialised memory instead of
    failing, so the vertex data is counted here first: text lines for ASCII files, bytes for binary
    files whose vertex element comes first and has fixed-size properties.
    """
    with open(path, "rb") as fh:
        head = fh.read(65536)
        end = head.find(b"end_header")
        if not head.startswith(b"ply") or end < 0:
            return ""  # not a PLY at all: open3d reads no points and says so
        lines = head[:end].decode("ascii", "replace").splitlines()
        fmt, count, sizes, first = "", 0, [], None
        for line in lines:
            words = line.split()
            if words[:1] == ["format"] and len(words) > 1:
                fmt = words[1]
            elif words[:1] == ["element"] and len(words) == 3:
                first = words[1] if first is None else first
                element = words[1]
                if element == "vertex":
                    count = int(words[2]) if words[2].isdigit() else 0
            elif words[:1] == ["property"] and first == "vertex" and element == "vertex":
                sizes.append(_PLY_SIZES.get(words[1], -1) if words[1] != "list" else -1)
        start = end + len(b"end_header")
        fh.seek(start)
        body = fh.read()
    body = body.lstrip(b"\r")
    body = body[1:] if body.startswith(b"\n") else body
    if fmt == "ascii":
        rows = sum(1 for line in body.splitlines() if line.strip())
        return f"{rows} data lines for {count} vertices" if rows < count else ""
    if first == "vertex" and sizes and min(sizes) > 0 and len(body) < count * sum(sizes):
        return f"{len(body)} bytes of vertex data for {count} vertices of {sum(sizes)} bytes"
    return ""


def read_point_cloud(path: str | os.PathLike, *, scale: float = 1.0, extra: str = "auto") -> PointCloud:
    """Read ``.ply``/``.pcd`` (open3d), ``.xyz`` (text, 3/6/9 columns) or ``.npy`` ((N, 3|6|9)).

    Args:
        path: the cloud file.
        scale: multiply coordinates by this (``0.001`` for a millimetre file into metres).
        extra: meaning of columns 4-6 of a 6-column ``.xyz``/``.npy``: 'normals', 'colors' or
            'auto' (unit-length rows are normals, values in 0-1 or 0-255 are colours).

    Returns:
        :class:`PointCloud` with ``points (N, 3)`` and normals/colours when the file has them.
        NaN/inf points are dropped with a warning giving the count (``dropped_nonfinite``).

    Raises:
        PointCloudReadError: missing, empty, unsupported or corrupt file, no finite points.
    """
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise PointCloudReadError(f"{name}: file not found")
    if p.stat().st_size == 0:
        raise PointCloudReadError(f"{name}: file is empty (0 bytes)")
    suffix = p.suffix.lower()
    if suffix not in CLOUD_EXTENSIONS:
        raise PointCloudReadError(f"{name}: unsupported point-cloud format {suffix!r} (expected one of {', '.join(CLOUD_EXTENSIONS)})")
    if suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for corrupt files
            raise PointCloudReadError(f"{name}: not a readable .npy array ({exc})") from exc
        cloud = _split_columns(np.asarray(array), name, extra)
    elif suffix == ".xyz":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on an empty text file
                array = np.loadtxt(p, dtype=np.float64, ndmin=2, comments=("#", "//"))
        except Exception as exc:  # noqa: BLE001
            raise PointCloudReadError(f"{name}: not a readable xyz text file ({exc})") from exc
        if array.size == 0:
            raise PointCloudReadError(f"{name}: the point cloud is empty (0 points)")
        cloud = _split_columns(array, name, extra)
    else:
        if suffix == ".ply":
            problem = _ply_truncation(p)
            if problem:  # open3d would hand back the missing vertices as uninitialised memory
                raise PointCloudReadError(f"{name}: truncated or corrupt .ply file ({problem})")
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            pcd = o3d.io.read_point_cloud(str(p), remove_nan_points=False, remove_infinite_points=False)
        if len(pcd.points) == 0:
            raise PointCloudReadError(f"{name}: no points could be read (empty, truncated or corrupt {suffix} file)")
        cloud = PointCloud.from_open3d(pcd, name)
    cloud.source = name
    cloud = _checked(cloud, name)
    if scale != 1.0:
        cloud.points = cloud.points * float(scale)
    return cloud


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics: pixel ``(u, v)`` with depth ``z`` maps to ``((u-cx) z/fx, (v-cy) z/fy, z)``.

    ``depth_scale`` is raw integer depth units per metre (1000 for millimetre PNGs).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    depth_scale: float = 1000.0

    @property
    def matrix(self) -> np.ndarray:
        """``(3, 3)`` K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def to_open3d(self) -> o3d.camera.PinholeCameraIntrinsic:
        return o3d.camera.PinholeCameraIntrinsic(int(self.width), int(self.height), self.fx, self.fy, self.cx, self.cy)

    def to_json(self) -> str:
        return json.dumps(
            {"width": self.width, "height": self.height, "fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy, "depth_scale": self.depth_scale}
        )


def read_intrinsics(path: str | os.PathLike) -> CameraIntrinsics:
    """Read the intrinsics JSON described in the module docstring (ours or open3d's)."""
    p = Path(path)
    if not p.is_file():
        raise PointCloudReadError(f"{p}: intrinsics file not found")
    try:
        d = json.loads(p.read_text())
        if "intrinsic_matrix" in d:  # open3d: column-major 3x3
            k = np.asarray(d["intrinsic_matrix"], dtype=np.float64).reshape(3, 3).T
            return CameraIntrinsics(k[0, 0], k[1, 1], k[0, 2], k[1, 2], int(d["width"]), int(d["height"]), float(d.get("depth_scale", 1000.0)))
        return CameraIntrinsics(
            float(d["fx"]), float(d["fy"]), float(d["cx"]), float(d["cy"]), int(d["width"]), int(d["height"]), float(d.get("depth_scale", 1000.0))
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise PointCloudReadError(f"{p}: not a valid intrinsics JSON (need width, height, fx, fy, cx, cy): {exc!r}") from exc


def read_depth_image(path: str | os.PathLike, depth_scale: float = 1000.0) -> np.ndarray:
    """Read a depth image as ``(H, W)`` float32 metres; invalid pixels (0, negative, NaN, inf) are 0.

    Integer images (16-bit PNG/TIFF) are divided by ``depth_scale`` (units per metre); float
    images (``.npy``, 32-bit TIFF) are taken as metres.
    """
    import cv2

    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise PointCloudReadError(f"{name}: depth image not found")
    suffix = p.suffix.lower()
    if suffix not in DEPTH_EXTENSIONS:
        raise PointCloudReadError(f"{name}: unsupported depth format {suffix!r} (expected 16-bit PNG/TIFF or float32 .npy/.tiff)")
    if suffix == ".npy":
        try:
            raw = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise PointCloudReadError(f"{name}: not a readable .npy array ({exc})") from exc
    else:
        raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise PointCloudReadError(f"{name}: not a readable depth image (empty, truncated or corrupt)")
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2 or raw.size == 0:
        raise PointCloudReadError(f"{name}: a depth image must be a single-channel (H, W) array, got shape {tuple(raw.shape)}")
    if np.issubdtype(raw.dtype, np.integer):
        if raw.dtype == np.uint8:
            raise PointCloudReadError(f"{name}: 8-bit image; depth must be 16-bit (mm) or float32 (m)")
        depth = raw.astype(np.float32) / np.float32(depth_scale)
    elif np.issubdtype(raw.dtype, np.floating):
        depth = raw.astype(np.float32)
    else:
        raise PointCloudReadError(f"{name}: unsupported depth dtype {raw.dtype}")
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def depth_to_point_cloud(
    depth: np.ndarray,
    intrinsics: CameraIntrinsics,
    rgb: np.ndarray | None = None,
    *,
    depth_trunc: float = 1000.0,
    stride: int = 1,
    name: str = "<depth>",
) -> PointCloud:
    """Back-project a metric depth image into the camera frame (x right, y down, z forward).

    Args:
        depth: ``(H, W)`` float metres; 0/NaN/inf/negative pixels are skipped.
        intrinsics: pinhole intrinsics of the depth camera (``width``/``height`` must match).
        rgb: optional ``(H, W, 3)`` uint8 colour image registered to the depth image.
        depth_trunc: depths beyond this (m) are skipped.
        stride: use every ``stride``-th pixel.

    Returns:
        :class:`PointCloud` with ``points (N, 3)`` in metres, row-major over valid pixels,
        and ``colors (N, 3)`` when ``rgb`` is given.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise PointCloudReadError(f"{name}: depth must be (H, W), got shape {tuple(depth.shape)}")
    h, w = depth.shape
    if (w, h) != (intrinsics.width, intrinsics.height):
        raise PointCloudReadError(f"{name}: depth image is {w}x{h} but the intrinsics say {intrinsics.width}x{intrinsics.height}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
    if not (depth > 0).any():
        raise PointCloudReadError(f"{name}: depth image has no valid pixel (all zero, negative or NaN)")
    k = intrinsics.to_open3d()
    depth_img = o3d.geometry.Image(np.ascontiguousarray(depth))
    if rgb is None:
        pcd = o3d.geometry.PointCloud.create_from_depth_image(depth_img, k, np.eye(4), depth_scale=1.0, depth_trunc=depth_trunc, stride=stride)
    else:
        rgb = np.asarray(rgb)
        if rgb.shape[:2] != (h, w) or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise PointCloudReadError(f"{name}: colour image must be ({h}, {w}, 3) to match the depth, got {tuple(rgb.shape)}")
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(rgb.astype(np.uint8))),
            depth_img,
            depth_scale=1.0,
            depth_trunc=depth_trunc,
            convert_rgb_to_intensity=False,
        )
        if stride != 1:
            raise ValueError("stride > 1 is not supported with a colour image")
        pcd = o3d.geometry.PointCloud.create_from_rgbd_image(rgbd, k)
    cloud = PointCloud.from_open3d(pcd, name)
    if len(cloud) == 0:
        raise PointCloudReadError(f"{name}: no valid depth within {depth_trunc} m")
    return _checked(cloud, name)


def read_rgbd(
    depth_path: str | os.PathLike,
    intrinsics: CameraIntrinsics | str | os.PathLike,
    rgb_path: str | os.PathLike | None = None,
    *,
    depth_trunc: float = 1000.0,
) -> PointCloud:
    """Read a depth image (+ intrinsics JSON or object, + optional registered RGB) as a cloud in metres."""
    from PIL import Image

    k = intrinsics if isinstance(intrinsics, CameraIntrinsics) else read_intrinsics(intrinsics)
    depth = read_depth_image(depth_path, k.depth_scale)
    rgb = None
    if rgb_path is not None:
        try:
            with Image.open(rgb_path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise PointCloudReadError(f"{rgb_path}: colour image could not be read ({exc})") from exc
    return depth_to_point_cloud(depth, k, rgb, depth_trunc=depth_trunc, name=str(depth_path))
