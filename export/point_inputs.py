"""Point-cloud inputs of a deployed model: files → the padded arrays the graph takes, and grasps back out.

    prep = PointPreprocessing.from_metadata(backend.metadata)     # as the checkpoint recorded it
    arrays = prep.load("part.ply")                                # {"points" (P, 3), "point_mask" (P,), "point_normals" (P, 3)}
    out = backend(stack_inputs([arrays]))                        # grasp_position (1, K, 3) … in sensor metres
    grasps = grasps_from_outputs(out, 0)                          # [{"position": [x, y, z], "approach": …, "score": …}, …]

Host side, exactly as in training (:func:`lineside.pointcloud.preprocess.preprocess_cloud`): read
``.ply``/``.pcd``/``.xyz``/``.npy`` (or a depth image + pinhole intrinsics JSON), drop NaN/inf points,
check the units say metres, crop to the workspace box (when one is recorded), statistical outlier
removal, voxel downsampling, normals (oriented toward the sensor at the origin) when the file has
none, then sample or zero-pad to ``num_points``. The arrays handed to the graph are in **sensor
metres**: centring and scaling run inside the graph (:class:`~lineside.pointcloud.cloud_normalizer.CloudNormalizer`),
from the ``num_points`` points given (training took the centroid before sampling; the two agree
when a cloud has at most ``num_points`` points after voxelisation, and differ by a fraction of a
millimetre to a few millimetres otherwise).

Depth images (``.png``/``.tif``/``.tiff``, or a 2-D ``.npy`` that is not an (N, 3|6|9) cloud) need
intrinsics: ``intrinsics=`` (``--intrinsics`` on the command line), else ``<stem>.json`` or
``intrinsics.json`` beside the image (:func:`lineside.pointcloud.io.read_intrinsics` formats).

Errors name the file (:class:`~lineside.pointcloud.io.PointCloudReadError` or ValueError), so a
results row or a station record can carry them.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "CLOUD_INPUT_EXTENSIONS",
    "DEPTH_EXTENSIONS",
    "PointPreprocessing",
    "default_clouds_dir",
    "grasps_from_outputs",
    "is_cloud_input",
    "read_cloud_input",
    "real_clouds",
    "stack_inputs",
]

log = logging.getLogger(__name__)

CLOUD_INPUT_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".npy")
DEPTH_EXTENSIONS = (".png", ".tif", ".tiff")
_REPO = Path(__file__).resolve().parents[1]


def is_cloud_input(path: str | os.PathLike) -> bool:
    """A file a point model can score: a cloud, or a depth image (intrinsics JSON sidecars are not inputs)."""
    return str(path).lower().endswith(CLOUD_INPUT_EXTENSIONS + DEPTH_EXTENSIONS)


def _features_name(value: Any) -> str | None:
    """A recorded ``features`` entry (``"normals"``, ``["normals"]``, 3, None …) → ``"normals"`` or None."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else ",".join(map(str, value))
    if value in (None, "", 0, "none", "None", "xyz", False):
        return None
    if value in ("normals", 3, "3", True):
        return "normals"
    raise ValueError(f"point features {value!r}: deployable point models take normals or none")


@dataclass(frozen=True)
class PointPreprocessing:
    """How a cloud is prepared on the host before the graph (the training preprocessing, without the normalisation).

    Attributes:
        num_points: P points per cloud (sampled without replacement, or zero-padded with the mask False).
        features: ``"normals"`` when the point encoder takes unit normals, else None.
        voxel_size: voxel downsampling (m); 0 = off.
        normal_radius: normal estimation radius (m).
        outlier_neighbors / outlier_std: statistical outlier removal (0 neighbours = off).
        workspace: ``((xmin, ymin, zmin), (xmax, ymax, zmax))`` crop in sensor metres, or None.
        min_points: fewer points left after preprocessing is an error.
        max_extent: a cloud spanning more than this (m) is taken for millimetres (an error).
        seed: the sampling seed (the same cloud always gives the same points).
    """

    num_points: int = 1024
    features: str | None = "normals"
    voxel_size: float = 0.002
    normal_radius: float = 0.01
    outlier_neighbors: int = 20
    outlier_std: float = 2.0
    workspace: tuple | None = None
    min_points: int = 16
    max_extent: float = 10.0
    seed: int = 0

    @classmethod
    def from_record(cls, record: dict | None, in_features: int | None = None) -> "PointPreprocessing":
        """From a checkpoint's ``lineside.points`` record (missing keys: the training defaults of
        :class:`lineside.pointcloud.grasp_dataset.GraspViewConfig`); ``in_features`` of the point
        encoder decides whether normals are fed when the record does not say."""
        from lineside.pointcloud.grasp_dataset import GraspViewConfig

        record = dict(record or {})
        view = GraspViewConfig()
        features = _features_name(record["features"]) if "features" in record else None
        if in_features is not None:
            wanted = "normals" if in_features == 3 else None
            if "features" in record and features != wanted:
                log.warning("the checkpoint records point features %r but the point encoder takes %d; following the encoder",
                            record["features"], in_features)
            features = wanted
        elif "features" not in record:
            features = "normals"
        workspace = record.get("workspace")
        return cls(
            num_points=int(record.get("num_points") or view.num_points),
            features=features,
            voxel_size=float(record.get("voxel_size", view.voxel_size) or 0.0),
            normal_radius=float(record.get("normal_radius") or view.normal_radius),
            outlier_neighbors=int(record.get("outlier_neighbors", 20)),
            outlier_std=float(record.get("outlier_std", 2.0)),
            workspace=tuple(tuple(float(v) for v in b) for b in workspace) if workspace else None,
            min_points=int(record.get("min_points", 16)),
            max_extent=float(record.get("max_extent", 10.0)),
        )

    @classmethod
    def from_loaded(cls, loaded: Any, deployable: Any = None) -> "PointPreprocessing":
        """From a :class:`~lineside.export.checkpoint.LoadedModel` (and its deployable: P and features)."""
        model = getattr(loaded, "model", None) if loaded is not None else None
        model = model if model is not None else getattr(deployable, "model", None)
        encoder = getattr(model, "point_encoder", None)
        prep = cls.from_record(getattr(loaded, "points", None), getattr(encoder, "in_features", None))
        if deployable is not None and deployable.num_points is not None and deployable.num_points != prep.num_points:
            prep = cls(**{**asdict(prep), "num_points": int(deployable.num_points)})
        return prep

    @classmethod
    def from_metadata(cls, meta: dict) -> "PointPreprocessing":
        """From an artefact's ``metadata.json`` (its ``points`` block and its inputs)."""
        names = {s["name"]: s for s in meta.get("inputs") or []}
        if "points" not in names:
            raise ValueError("this model takes no point clouds (its inputs are " + ", ".join(names) + ")")
        record = dict(meta.get("points") or {})
        record["num_points"] = int(names["points"]["shape"][1])
        return cls.from_record(record, 3 if "point_normals" in names else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["workspace"] = [list(b) for b in self.workspace] if self.workspace else None
        return d

    # -- one cloud -----------------------------------------------------------------------------
    def prepare(self, cloud: Any) -> dict[str, np.ndarray]:
        """A :class:`~lineside.pointcloud.io.PointCloud` in sensor metres → ``points`` (P, 3) float32 metres,
        ``point_mask`` (P,) bool, ``point_normals`` (P, 3) float32 (when ``features`` is normals).

        Raises ValueError naming the file (millimetres, nothing left after cropping, too few points).
        """
        from lineside.pointcloud.preprocess import preprocess_cloud

        ready = preprocess_cloud(
            cloud, self.num_points, workspace=self.workspace, voxel_size=self.voxel_size, outlier_neighbors=self.outlier_neighbors,
            outlier_std=self.outlier_std, normal_radius=self.normal_radius, min_points=self.min_points, max_extent=self.max_extent,
            rng=self.seed,
        )
        mask = ready.mask.astype(bool)
        points = np.zeros((self.num_points, 3), np.float32)
        points[mask] = ready.transform.to_sensor(ready.points[mask].astype(np.float64)).astype(np.float32)
        out = {"points": points, "point_mask": mask}
        if self.features == "normals":
            normals = np.zeros((self.num_points, 3), np.float32)
            n = ready.normals[mask].astype(np.float64)
            normals[mask] = (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            out["point_normals"] = normals
        return out

    def load(self, path: str | os.PathLike, intrinsics: Any = None) -> dict[str, np.ndarray]:
        """Read ``path`` (see :func:`read_cloud_input`) and :meth:`prepare` it."""
        return self.prepare(read_cloud_input(path, intrinsics))


# -- reading --------------------------------------------------------------------------------------
def _npy_is_depth(path: Path) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - the cloud reader reports the corrupt file
        return False
    return a.ndim == 2 and a.shape[1] not in (3, 6, 9) or (a.ndim == 3 and a.shape[2] == 1)


def _sidecar_intrinsics(path: Path) -> Path | None:
    for candidate in (path.with_suffix(".json"), path.parent / "intrinsics.json"):
        if candidate.is_file():
            return candidate
    return None


def read_cloud_input(path: str | os.PathLike, intrinsics: Any = None) -> Any:
    """A cloud file, or a depth image with intrinsics, as a :class:`~lineside.pointcloud.io.PointCloud` in metres.

    Args:
        path: ``.ply``/``.pcd``/``.xyz``/``.npy`` cloud, or a depth image (16-bit PNG/TIFF in mm, float32
            TIFF/``.npy`` in m).
        intrinsics: a :class:`~lineside.pointcloud.io.CameraIntrinsics` or JSON path for depth images;
            None = ``<stem>.json`` or ``intrinsics.json`` beside the image.
    """
    from lineside.pointcloud.io import PointCloudReadError, read_point_cloud, read_rgbd

    p = Path(path)
    suffix = p.suffix.lower()
    depth = suffix in DEPTH_EXTENSIONS or (suffix == ".npy" and p.is_file() and _npy_is_depth(p))
    if not depth:
        return read_point_cloud(p)
    k = intrinsics if intrinsics is not None else _sidecar_intrinsics(p)
    if k is None:
        raise PointCloudReadError(f"{p}: a depth image needs pinhole intrinsics: pass --intrinsics JSON or put "
                                  f"{p.with_suffix('.json').name} or intrinsics.json beside it")
    return read_rgbd(p, k)


def stack_inputs(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-cloud arrays (from :meth:`PointPreprocessing.prepare`) → one batch of named arrays."""
    if not items:
        raise ValueError("no clouds to stack")
    return {k: np.ascontiguousarray(np.stack([it[k] for it in items])) for k in items[0]}


def default_clouds_dir() -> Path:
    """The real workshop-tool clouds (``$LINESIDE_WORKSHOP_TOOLS`` or ``../shared/data/workshop_tools`` beside the repository)."""
    return Path(os.environ.get("LINESIDE_WORKSHOP_TOOLS") or _REPO.parent / "shared" / "data" / "workshop_tools")


def real_clouds(calib: str | os.PathLike | None, prep: PointPreprocessing, n: int = 16) -> tuple[dict[str, np.ndarray], list[str]]:
    """Up to ``n`` real clouds prepared for the graph (named arrays, batch first) and their paths.

    Args:
        calib: a folder (recursive) or glob of ``.ply``/``.pcd``/``.npy``/… clouds in metres; None = the
            workshop tools' ``point-cloud.ply`` (real scans, metres).
        prep: the model's host-side preprocessing.
        n: how many; spread evenly over the sorted files.
    """
    from lineside.export.calibration import CalibrationError

    if calib is None:
        root = default_clouds_dir()
        paths = sorted(_glob.glob(str(root / "tools" / "*" / "point-cloud.ply")))
        source = f"workshop tools ({root})"
        if not paths:
            raise CalibrationError(f"{root}: no tools/*/point-cloud.ply; give --calib DIR with .ply/.pcd/.npy clouds in metres")
    else:
        spec = os.fspath(calib)
        if os.path.isdir(spec):
            paths = sorted(str(f) for f in Path(spec).rglob("*") if f.is_file() and is_cloud_input(f)
                           and not any(part.startswith(".") for part in f.relative_to(spec).parts))
        else:
            paths = sorted(f for f in _glob.glob(spec, recursive=True) if os.path.isfile(f))
        source = spec
        if not paths:
            raise CalibrationError(f"{source}: no point clouds found (.ply, .pcd, .xyz, .npy)")
    pick = np.linspace(0, len(paths) - 1, num=min(n, len(paths))).round().astype(int)
    items, used, bad = [], [], 0
    for i in dict.fromkeys(pick.tolist()):
        try:
            items.append(prep.load(paths[i]))
            used.append(paths[i])
        except Exception as exc:  # noqa: BLE001 - a bad calibration cloud is skipped, with a count
            bad += 1
            log.warning("parity clouds: skipped %s", exc)
    if not items:
        raise CalibrationError(f"{source}: none of {len(pick)} clouds could be prepared")
    if bad:
        log.warning("parity clouds: %d of %d skipped", bad, len(pick))
    return stack_inputs(items), used


# -- outputs --------------------------------------------------------------------------------------
def grasps_from_outputs(outputs: dict[str, np.ndarray], i: int, digits: int = 6) -> list[dict] | None:
    """The ranked grasps of cloud ``i`` as JSON-ready dicts (``position`` [x, y, z] m, the point midway
    between the jaws, ``approach``, ``closing`` unit vectors, ``width`` m, the jaw width at the
    contacts, ``score``); exhausted picks (score 0) are left out.
    None when the outputs carry no grasps."""
    if "grasp_position" not in outputs:
        return None
    pos, app, clo = (np.asarray(outputs[k][i], np.float64) for k in ("grasp_position", "grasp_approach", "grasp_closing"))
    width, score = np.asarray(outputs["grasp_width"][i], np.float64), np.asarray(outputs["grasp_score"][i], np.float64)
    return [
        {"position": np.round(pos[j], digits).tolist(), "approach": np.round(app[j], digits).tolist(),
         "closing": np.round(clo[j], digits).tolist(), "width": round(float(width[j]), digits), "score": round(float(score[j]), digits)}
        for j in range(len(score)) if score[j] > 0
    ]
