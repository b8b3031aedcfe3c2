"""Grasp-suggestion datasets: parts as a line-side depth camera sees them, with antipodal grasp labels.

:class:`PartGraspDataset` (procedural parts, training) and :class:`WorkshopToolsDataset` (the real
tool meshes of ``shared/data/workshop_tools``, evaluation) build each sample the same way:

1. a part mesh (metres) in a seeded pose, a camera on a seeded viewpoint looking at it;
2. :func:`~.parts.render_partial_view` (one side only, depth noise, dropouts);
3. the cloud in the **camera frame** (the sensor frame: the camera sits at the origin, so normals
   estimated by :func:`~.preprocess.preprocess_cloud` point toward it) → crop-free
   :func:`~.preprocess.preprocess_cloud` (outliers, voxel, normals, normalise, :func:`~.preprocess.sample_fixed`);
4. ground truth from :func:`~.grasp_labels.antipodal_grasps` on the mesh (moved into the camera frame),
   kept when the gripper can come from the camera side and the grasp touches what the camera saw
   (the *visibility rule* below), converted to the normalised frame.

Visibility rule (documented choice): a grasp is kept when

* its approach (palm → fingertips) points away from the camera, i.e. the palm is on the camera
  side: ``dot(approach, unit(position)) >= min_approach_cos`` (camera at the origin); and
* at least one of its two contacts ``position ± width/2 · closing`` lies within
  ``visible_radius`` (m) of an observed (noisy) point.

Sample dict (numpy here; :func:`collate` makes tensors):

============== =============== ===========================================================
key            shape / type    meaning
============== =============== ===========================================================
points         (P, 3) float32  normalised positions ``(camera - center) / scale``; zeros where padded
point_mask     (P,) bool       True = real point
features       (P, 3) float32  unit normals (oriented toward the camera); zeros where padded
grasps         (M, 11) float32 normalised grasps (layout of :mod:`.grasp_labels`): position via
                               ``to_normalized``, approach/closing unchanged, width / scale, score
center         (3,) float32    sensor (camera-frame) centre: ``sensor = normalised * scale + center``
scale          () float32      metres per normalised unit
part_id        int             index of the sample in its dataset
mesh           str             JSON reference to the mesh in the camera frame (:func:`load_mesh`)
image          (1, S, S) uint8 only with ``image_size=S``: the grey intensity image of the same view
                               (:func:`~.parts.render_intensity`: same camera pose and intrinsics,
                               central square of the frame, Lambertian ring-light shading, a seeded
                               albedo in 0.5-1.0, 2 grey levels of noise)
============== =============== ===========================================================

:func:`collate` stacks to ``points (B, P, 3)``, ``point_mask (B, P)``, ``features (B, P, 3)``,
``grasps (B, M_max, 11)`` zero-padded with ``grasp_mask (B, M_max)`` (True = real grasp),
``center (B, 3)``, ``scale (B,)``, ``part_id (B,)`` int64, ``mesh`` (list of B str) and, when every
sample has one, ``image (B, 1, S, S)`` uint8.

Samples are cached as ``cache_dir/<key>/<index>.npz`` where ``key`` hashes the dataset config
(seed included), so a run is reproducible and the second epoch reads files only.

Also here, for evaluation without the model stack (this package never imports ``fusion``):
:func:`grasp_success` / :func:`evaluate_topk` (analytic success of decoded grasps on the meshes,
``protocol="lenient"`` or ``"strict"``: the grasp as predicted, with its width and centre) and
:func:`analytic_grasp_baseline` (antipodal pairs on the observed cloud ranked by geometry) and
:func:`slab_grasp_baseline` (top-down grasps across the narrowest local extent); both baselines give
each grasp the width the cloud shows between its contacts, so the strict check can judge them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import open3d as o3d
import torch
from scipy.spatial import cKDTree
from torch.utils.data import Dataset

from .grasp_labels import (
    GRASP_DIM,
    STRICT_CLEARANCE,
    STRICT_STANDOFF,
    STRICT_WIDTH_TOLERANCE,
    GraspScene,
    ParallelJawGripper,
    antipodal_grasps,
    evaluate_grasps,
    evaluate_grasps_strict,
    make_grasps,
)
from .io import CameraIntrinsics, PointCloud
from .parts import (
    PART_KINDS,
    look_at,
    make_part,
    random_part,
    random_rotation,
    render_intensity,
    render_partial_view,
)
from .preprocess import preprocess_cloud

__all__ = [
    "GraspViewConfig",
    "PartGraspDataset",
    "WorkshopToolsDataset",
    "analytic_grasp_baseline",
    "collate",
    "evaluate_topk",
    "grasp_success",
    "load_mesh",
    "slab_grasp_baseline",
    "visible_grasps",
]


@dataclass(frozen=True)
class GraspViewConfig:
    """How a part is seen and labelled (every field enters the cache key).

    Attributes:
        num_points: P points per cloud.
        distance: (min, max) camera distance to the part centre (m).
        noise_std: depth noise (m). dropout: fraction of lost returns.
        voxel_size: preprocessing voxel (m). normal_radius: normal estimation radius (m).
        num_samples / num_approaches: :func:`antipodal_grasps` sampling.
        max_grasps: keep at most this many labels per sample (best score first).
        min_approach_cos: visibility rule, approach vs the camera ray.
        visible_radius: visibility rule, contact to nearest observed point (m).
        mu: friction coefficient.
    """

    num_points: int = 1024
    distance: tuple = (0.3, 0.5)
    noise_std: float = 0.0005
    dropout: float = 0.02
    voxel_size: float = 0.002
    normal_radius: float = 0.01
    num_samples: int = 300
    num_approaches: int = 8
    max_grasps: int = 256
    min_approach_cos: float = 0.0
    visible_radius: float = 0.005
    mu: float = 0.5
    gripper: ParallelJawGripper = field(default_factory=ParallelJawGripper)

    def key(self, extra: dict) -> str:
        blob = json.dumps({**asdict(self), **extra}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


#: enters every cache key; bumped when rendering or labelling changes (2: contacts are the pads' first touch;
#: 3: pad rays 1 mm apart, so thin parts cannot slip between them)
LABEL_VERSION = 3


def _mesh_ref(**ref: Any) -> str:
    ref = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in ref.items()}
    return json.dumps(ref, sort_keys=True)


def load_mesh(ref: str) -> o3d.geometry.TriangleMesh:
    """A sample's ``mesh`` reference → the open3d mesh in that sample's sensor (camera) frame, metres.

    References are JSON: ``{"kind", "dims", "pose"}`` (procedural: ``make_part(kind, **dims)`` then
    ``pose``) or ``{"path", "scale", "pose"}`` (a mesh file scaled to metres, then ``pose``).
    """
    r = json.loads(ref)
    if "path" in r:
        mesh = o3d.io.read_triangle_mesh(r["path"])
        if not mesh.has_triangles():
            raise ValueError(f"{r['path']}: no triangles")
        mesh.scale(float(r.get("scale", 1.0)), center=np.zeros(3))
    else:
        mesh = make_part(r["kind"], **r["dims"])
    mesh.transform(np.asarray(r["pose"], np.float64))
    mesh.compute_triangle_normals()
    return mesh


def _contacts(grasps: np.ndarray) -> np.ndarray:
    """(G, 11) → (G, 2, 3) the two contact points."""
    half = grasps[:, 9:10] / 2 * grasps[:, 6:9]
    return np.stack([grasps[:, 0:3] + half, grasps[:, 0:3] - half], 1)


def visible_grasps(grasps: np.ndarray, observed: np.ndarray, min_approach_cos: float = 0.0, visible_radius: float = 0.005) -> np.ndarray:
    """Boolean (G,) mask of the visibility rule for grasps in the camera frame (camera at the origin).

    Args:
        grasps: (G, 11) sensor-frame grasps. observed: (N, 3) observed points (camera frame).
    """
    if len(grasps) == 0 or len(observed) == 0:
        return np.zeros(len(grasps), bool)
    ray = grasps[:, 0:3] / np.maximum(np.linalg.norm(grasps[:, 0:3], axis=1, keepdims=True), 1e-9)
    from_camera = (grasps[:, 3:6] * ray).sum(1) >= min_approach_cos
    dist, _ = cKDTree(observed).query(_contacts(grasps).reshape(-1, 3))
    seen = (dist.reshape(-1, 2) <= visible_radius).any(1)
    return from_camera & seen


def _viewpoint(rng: np.random.Generator, distance: Sequence[float], target: np.ndarray) -> np.ndarray:
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    return target + d * rng.uniform(*distance)


def _build_sample(mesh_world: o3d.geometry.TriangleMesh, cam_pose: np.ndarray, cfg: GraspViewConfig, rng: np.random.Generator, seed: int,
                  image_size: int | None = None) -> dict:
    """Render, preprocess and label one view; everything returned in the camera frame / normalised.
    With ``image_size`` also the view's intensity image (its own seeded generator, so the points and
    labels are those of the image-less view)."""
    view = render_partial_view(mesh_world, cam_pose, noise_std=cfg.noise_std, dropout=cfg.dropout, rng=rng)
    cloud = PointCloud(view.points_camera.copy(), source="<virtual depth camera>")
    ready = preprocess_cloud(cloud, cfg.num_points, voxel_size=cfg.voxel_size, normal_radius=cfg.normal_radius, min_points=16, rng=rng)
    world_to_cam = np.linalg.inv(cam_pose)
    mesh_cam = o3d.geometry.TriangleMesh(mesh_world).transform(world_to_cam)
    scene = GraspScene(mesh_cam)
    g = antipodal_grasps(mesh_cam, cfg.gripper, mu=cfg.mu, num_samples=cfg.num_samples, num_approaches=cfg.num_approaches,
                         seed=seed, recheck=False)
    g = g[visible_grasps(g, view.points_camera, cfg.min_approach_cos, cfg.visible_radius)]
    keep: list[np.ndarray] = []  # the kept labels pass the full (fine pad-ray) check, best first
    for start in range(0, len(g), cfg.max_grasps):
        part = g[start : start + cfg.max_grasps].copy()
        ok, width, _, centre = evaluate_grasps(scene, part, cfg.gripper, cfg.mu)
        part[:, 0:3], part[:, 9] = np.where(ok[:, None], centre, part[:, 0:3]), np.where(ok, width, part[:, 9])
        keep.append(part[ok])
        if sum(map(len, keep)) >= cfg.max_grasps:
            break
    g = np.concatenate(keep)[: cfg.max_grasps] if keep else g[:0]
    t = ready.transform
    image = None
    if image_size:
        img_rng = np.random.default_rng([seed, 17])
        image = render_intensity(mesh_world, cam_pose, view.intrinsics, int(image_size), albedo=float(img_rng.uniform(0.5, 1.0)), rng=img_rng)[None]
    gn = g.copy()
    gn[:, 0:3] = t.to_normalized(g[:, 0:3])
    gn[:, 9] = g[:, 9] / t.scale
    out = {
        "points": ready.points.astype(np.float32),
        "point_mask": ready.mask.astype(bool),
        "features": ready.normals.astype(np.float32),
        "grasps": gn.astype(np.float32).reshape(-1, GRASP_DIM),
        "center": np.asarray(t.center, np.float32),
        "scale": np.asarray(t.scale, np.float32),
    }
    if image is not None:
        out["image"] = image
    return out


class _CachedGraspDataset(Dataset):
    """Shared caching: subclasses implement ``_generate(index) -> (sample, mesh_ref)`` and ``_key_extra``."""

    def __init__(self, length: int, config: GraspViewConfig | None, seed: int, cache_dir: str | Path | None,
                 image_size: int | None = None) -> None:
        self.length = int(length)
        self.image_size = int(image_size) if image_size else None
        self.config = config or GraspViewConfig()
        self.seed = int(seed)
        self.cache_dir = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir) / self.config.key(
                {"seed": self.seed, "dataset": type(self).__name__, "labels": LABEL_VERSION, **self._key_extra(),
                 **({"image_size": self.image_size} if self.image_size else {})})
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _key_extra(self) -> dict:
        return {}

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        path = None if self.cache_dir is None else self.cache_dir / f"{index}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                sample = {k: z[k] for k in z.files}
            sample["mesh"] = str(sample["mesh"])
        else:
            sample = self._generate(index)
            if path is not None:
                tmp = path.with_name(f".{path.stem}.{np.random.default_rng().integers(1 << 30)}.tmp.npz")
                np.savez(tmp, **sample)
                tmp.replace(path)  # atomic: parallel workers never read half a file
        sample["part_id"] = int(index)
        return sample

    def mesh(self, index: int) -> o3d.geometry.TriangleMesh:
        """The mesh of sample ``index`` in its camera frame (metres)."""
        return load_mesh(self[index]["mesh"])


class PartGraspDataset(_CachedGraspDataset):
    """Procedural parts (:func:`~.parts.random_part`, uniformly rotated) seen from a random viewpoint.

    Args:
        length: number of samples. config: :class:`GraspViewConfig`. seed: dataset seed (sample ``i``
        draws from ``default_rng([seed, i])``). kinds: part kinds to draw from. cache_dir: npz cache root.
        max_tries: a view with fewer than 16 points is redrawn (next sub-seed) up to this often.
        image_size: also render each view's intensity image, ``image`` (1, S, S) uint8 (enters the cache key).
    """

    def __init__(
        self,
        length: int = 1000,
        config: GraspViewConfig | None = None,
        seed: int = 0,
        kinds: Sequence[str] = PART_KINDS,
        cache_dir: str | Path | None = None,
        max_tries: int = 5,
        image_size: int | None = None,
    ) -> None:
        self.kinds = tuple(kinds)
        self.max_tries = max_tries
        super().__init__(length, config, seed, cache_dir, image_size)

    def _key_extra(self) -> dict:
        return {"kinds": list(self.kinds)}

    def _generate(self, index: int) -> dict:
        rng = self._rng(index)
        err: Exception | None = None
        for _ in range(self.max_tries):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            part = random_part(rng, kind)
            cam = look_at(_viewpoint(rng, self.config.distance, np.zeros(3)))
            try:
                sample = _build_sample(part.mesh, cam, self.config, rng, seed=int(rng.integers(1 << 31)), image_size=self.image_size)
            except ValueError as e:  # the camera saw too little: draw again
                err = e
                continue
            sample["mesh"] = _mesh_ref(kind=kind, dims={k: float(v) for k, v in part.dims.items()}, pose=np.linalg.inv(cam) @ part.pose)
            return sample
        raise RuntimeError(f"PartGraspDataset: sample {index} failed {self.max_tries} times: {err}")


class WorkshopToolsDataset(_CachedGraspDataset):
    """Partial noisy views of the real workshop-tool meshes (``workshop_tools/tools/<name>/mesh.ply``, mm → m).

    Sample ``i`` shows tool ``i % len(tools)`` (centred at its bounding-box centre, uniformly rotated)
    from a random viewpoint; ``views_per_tool`` views each. Labels: the same routine as
    :class:`PartGraspDataset`.

    Args:
        root: the ``workshop_tools`` folder (holds ``manifest.csv`` and ``tools/``).
        tools: tool names (default: every row of ``manifest.csv`` whose mesh exists).
        views_per_tool: samples per tool. config / seed / cache_dir: as :class:`PartGraspDataset`
        (the default config places the camera 0.5-0.7 m away: tools are up to 0.3 m long).
        image_size: as :class:`PartGraspDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        tools: Sequence[str] | None = None,
        views_per_tool: int = 4,
        config: GraspViewConfig | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        image_size: int | None = None,
    ) -> None:
        import csv

        self.root = Path(root)
        if tools is None:
            with open(self.root / "manifest.csv", newline="") as f:
                tools = [r["object"] for r in csv.DictReader(f)]
        self.tools = [t for t in tools if (self.root / "tools" / t / "mesh.ply").is_file()]
        if not self.tools:
            raise FileNotFoundError(f"{self.root}: no tools/<name>/mesh.ply found for {list(tools)}")
        self.views_per_tool = int(views_per_tool)
        super().__init__(len(self.tools) * self.views_per_tool, config or GraspViewConfig(distance=(0.5, 0.7)), seed, cache_dir,
                         image_size)

    def _key_extra(self) -> dict:
        return {"tools": self.tools, "views": self.views_per_tool}

    def tool_name(self, index: int) -> str:
        return self.tools[index % len(self.tools)]

    def _generate(self, index: int) -> dict:
        rng = self._rng(index)
        path = self.root / "tools" / self.tool_name(index) / "mesh.ply"
        mesh = o3d.io.read_triangle_mesh(str(path))
        mesh.scale(0.001, center=np.zeros(3))
        pose = np.eye(4)
        pose[:3, :3] = random_rotation(rng)
        pose[:3, 3] = -pose[:3, :3] @ mesh.get_axis_aligned_bounding_box().get_center()
        mesh.transform(pose)
        mesh.compute_triangle_normals()
        cam = look_at(_viewpoint(rng, self.config.distance, np.zeros(3)))
        sample = _build_sample(mesh, cam, self.config, rng, seed=int(rng.integers(1 << 31)), image_size=self.image_size)
        sample["mesh"] = _mesh_ref(path=str(path.resolve()), scale=0.001, pose=np.linalg.inv(cam) @ pose)
        return sample


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch; grasps zero-padded to the batch's largest M with ``grasp_mask``."""
    b = len(samples)
    m = max([len(s["grasps"]) for s in samples] + [1])
    grasps = torch.zeros(b, m, GRASP_DIM)
    gmask = torch.zeros(b, m, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["grasps"])
        grasps[i, :n] = torch.from_numpy(np.asarray(s["grasps"], np.float32))
        gmask[i, :n] = True
    out = {
        "points": torch.from_numpy(np.stack([s["points"] for s in samples])).float(),
        "point_mask": torch.from_numpy(np.stack([s["point_mask"] for s in samples])).bool(),
        "grasps": grasps,
        "grasp_mask": gmask,
        "center": torch.from_numpy(np.stack([s["center"] for s in samples])).float(),
        "scale": torch.as_tensor(np.array([float(s["scale"]) for s in samples]), dtype=torch.float32),
        "part_id": torch.as_tensor([int(s["part_id"]) for s in samples], dtype=torch.int64),
        "mesh": [str(s["mesh"]) for s in samples],
    }
    if all(s.get("features") is not None for s in samples):
        out["features"] = torch.from_numpy(np.stack([s["features"] for s in samples])).float()
    if all(s.get("image") is not None for s in samples):
        out["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))
    return out


def grasp_success(
    position: np.ndarray,
    approach: np.ndarray,
    closing: np.ndarray,
    meshes: Sequence,
    score: np.ndarray | None = None,
    gripper: ParallelJawGripper = ParallelJawGripper(),
    mu: float = 0.5,
    *,
    width: np.ndarray | None = None,
    protocol: Literal["lenient", "strict"] = "lenient",
    clearance: float = STRICT_CLEARANCE,
    width_tolerance: float = STRICT_WIDTH_TOLERANCE,
    standoff: float = STRICT_STANDOFF,
) -> np.ndarray:
    """(N, K) bool: does each ranked grasp succeed on its sample's mesh under ``protocol``?

    * ``"lenient"``: :func:`~.grasp_labels.evaluate_grasps`. The jaws open to the gripper's
      ``max_width`` whatever the prediction, each finger closes until its pad touches the part, and
      the grasp is re-centred between those contacts: the width is ignored and a centre off the part
      can pass when the part lies within the open jaws. It asks "is there a graspable spot here?".
    * ``"strict"``: :func:`~.grasp_labels.evaluate_grasps_strict`, the grasp executed as predicted
      (``position`` = the point midway between the jaws, ``width`` the jaw width, no re-centring):
      jaws opened to ``min(width + clearance, max_width)`` symmetrically about the predicted centre;
      the open gripper moves ``standoff`` m along ``approach`` onto the pose with no finger or palm
      sample inside the part; the jaws close symmetrically about the predicted centre and both pads
      must touch the part before they meet there (the part between them, straddling the centre);
      ``|width - contact distance| <= width_tolerance``; both contact normals inside the friction
      cone (half-angle ``atan(mu)``). Needs ``width``.

    Arguments as :func:`evaluate_topk`, plus ``width`` (N, K) predicted jaw widths (m) and the strict
    protocol's ``clearance`` (1 cm), ``width_tolerance`` (5 mm) and ``standoff`` (5 cm). A mesh
    reference used by consecutive samples is loaded once (pass :class:`~.grasp_labels.GraspScene`
    objects to reuse them across calls). Grasps with score <= 0 (exhausted picks) are False.
    """
    if protocol not in ("lenient", "strict"):
        raise ValueError(f"grasp_success: protocol must be 'lenient' or 'strict', got {protocol!r}")
    position, approach, closing = (np.asarray(a, np.float64) for a in (position, approach, closing))
    n, k = position.shape[:2]
    if protocol == "strict":
        if width is None:
            raise ValueError("grasp_success: the strict protocol needs the predicted widths (width=(N, K) metres)")
        width = np.asarray(width, np.float64)
        if width.shape != (n, k):
            raise ValueError(f"grasp_success: width has shape {width.shape}, expected {(n, k)}")
    ok = np.zeros((n, k), bool)
    last_ref, scene = None, None
    for i in range(n):
        mesh = meshes[i]
        if isinstance(mesh, str):
            if mesh != last_ref:
                last_ref, scene = mesh, GraspScene(load_mesh(mesh))
        else:
            scene = mesh if isinstance(mesh, GraspScene) else GraspScene(mesh)
        if protocol == "strict":
            g = make_grasps(position[i], approach[i], closing[i], width[i])
            ok[i] = evaluate_grasps_strict(scene, g, gripper, mu, clearance=clearance, width_tolerance=width_tolerance, standoff=standoff).ok
        else:
            ok[i], *_ = evaluate_grasps(scene, make_grasps(position[i], approach[i], closing[i], 0.0), gripper, mu)
    if score is not None:
        ok &= np.asarray(score) > 0
    return ok


def evaluate_topk(
    position: np.ndarray,
    approach: np.ndarray,
    closing: np.ndarray,
    meshes: Sequence,
    score: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5),
    gripper: ParallelJawGripper = ParallelJawGripper(),
    mu: float = 0.5,
    **protocol: Any,
) -> dict[str, float]:
    """Analytic success of ranked grasps per sample (sensor frame, metres).

    Args:
        position, approach, closing: (N, K, 3) ranked grasps (best first), e.g. the decoder's outputs.
        meshes: N open3d meshes, :class:`GraspScene` objects or :func:`load_mesh` references.
        score: optional (N, K); grasps with score <= 0 (exhausted picks) count as failures.
        ks: report ``top{k}`` = fraction of samples with a successful grasp among the first k.
        protocol: keyword arguments of :func:`grasp_success` (``protocol="strict"``, ``width`` …).

    Returns:
        ``{"top1": …, "top5": …, "precision": fraction of all scored grasps that succeed}``.
    """
    n, k = np.shape(position)[:2]
    ok = grasp_success(position, approach, closing, meshes, score, gripper, mu, **protocol)
    live = np.ones((n, k), bool) if score is None else np.asarray(score) > 0
    out = {f"top{kk}": float(ok[:, :kk].any(1).mean()) if n else 0.0 for kk in ks}
    out["precision"] = float(ok.sum() / max(live.sum(), 1))
    return out


def _baseline_cloud(
    points: np.ndarray, normals: np.ndarray, rng: np.random.Generator | int | None, min_points: int
) -> tuple[np.ndarray, np.ndarray, np.random.Generator, cKDTree] | None:
    """A baseline's inputs: (N, 3) points and normals as float64, a generator from ``rng`` and a KD-tree
    of the points; None for a cloud of fewer than ``min_points`` points."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    pts, nrm = np.asarray(points, np.float64), np.asarray(normals, np.float64)
    if len(pts) < min_points:
        return None
    return pts, nrm, rng, cKDTree(pts)


def _best_after_nms(cands: list[tuple], k: int, nms_radius: float) -> np.ndarray:
    """Candidates ``(score, centre, approach, closing, width)`` → (k', 11) grasps (k' <= k), best first:
    greedy NMS keeps a candidate whose centre is more than ``nms_radius`` m from every kept one."""
    if not cands:
        return np.zeros((0, GRASP_DIM), np.float32)
    chosen: list[tuple] = []
    for cand in sorted(cands, key=lambda t: -t[0]):
        if all(np.linalg.norm(cand[1] - o[1]) > nms_radius for o in chosen):
            chosen.append(cand)
        if len(chosen) == k:
            break
    return make_grasps([c[1] for c in chosen], [c[2] for c in chosen], [c[3] for c in chosen], [c[4] for c in chosen], [c[0] for c in chosen])


#: how far (m) beyond a sampled contact pair :func:`analytic_grasp_baseline` looks for points the pads meet first
PAD_EXTENT_MARGIN = 0.005
#: added to an observed extent for the edge the 2 mm voxel thins away (both baselines)
VOXEL_EDGE = 0.002


def _pad_extent(pts: np.ndarray, tree: cKDTree, centre: np.ndarray, approach: np.ndarray, closing: np.ndarray, width: float,
                reach: float, gripper: ParallelJawGripper) -> tuple[np.ndarray, float]:
    """The jaws' contact distance the cloud shows at a grasp: the observed points in the pads' footprint
    (``|y| <= finger_width / 2``, ``tip_margin - finger_depth <= z <= tip_margin`` in the gripper frame)
    within ``reach`` of ``centre`` along the closing axis are what parallel pads closing from there meet
    first; returns the midpoint of their extent along the closing axis (the point midway between the
    jaws) and that extent + :data:`VOXEL_EDGE`; ``(centre, width)`` unchanged with fewer than 2 such points."""
    c, z, x = (np.asarray(v, np.float64) for v in (centre, approach, closing))
    y = np.cross(z, x)
    radius = np.sqrt(reach**2 + (gripper.finger_width / 2) ** 2 + max(gripper.finger_depth - gripper.tip_margin, gripper.tip_margin) ** 2)
    near = np.asarray(tree.query_ball_point(c, radius), np.int64)
    d = pts[near] - c
    lx, ly, lz = d @ x, d @ y, d @ z
    sel = (np.abs(lx) <= reach) & (np.abs(ly) <= gripper.finger_width / 2) & (lz >= gripper.tip_margin - gripper.finger_depth) & (lz <= gripper.tip_margin)
    if sel.sum() < 2:
        return c, float(width)
    hi, lo = float(lx[sel].max()), float(lx[sel].min())
    return c + (hi + lo) / 2 * x, hi - lo + VOXEL_EDGE


def antipodal_partners(pts: np.ndarray, nrm: np.ndarray, tree: cKDTree, i: int, cos_cone: float,
                       gripper: ParallelJawGripper) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The points within the jaw span of seed ``i`` that form an antipodal pair with it.

    Returns ``(nbr, w, c, s)``: neighbour indices, pair widths, unit closing directions (seed → neighbour)
    and the pair score ``min(|c·n_i|, |c·n_j|)``, -1 where the pair leaves either friction cone (``cos_cone``)
    or is narrower than the gripper's minimum width (2 mm at least); None where no pair qualifies.
    """
    nbr = np.asarray(tree.query_ball_point(pts[i], gripper.max_width), np.int64)
    nbr = nbr[nbr != i]
    if len(nbr) == 0:
        return None
    d = pts[nbr] - pts[i]
    w = np.linalg.norm(d, axis=1)
    c = d / np.maximum(w[:, None], 1e-12)
    ci, cj = np.abs(c @ nrm[i]), np.abs((c * nrm[nbr]).sum(1))
    good = (ci >= cos_cone) & (cj >= cos_cone) & (w >= max(gripper.min_width, 0.002))
    if not good.any():
        return None
    return nbr, w, c, np.where(good, np.minimum(ci, cj), -1.0)


def camera_approach(centre: np.ndarray, closing: np.ndarray) -> np.ndarray | None:
    """Unit approach from the camera (sensor origin) toward ``centre``, made orthogonal to ``closing``;
    None where the two are parallel."""
    a = centre / max(np.linalg.norm(centre), 1e-9)
    a = a - (a @ closing) * closing
    n = np.linalg.norm(a)
    return None if n < 1e-6 else a / n


def analytic_grasp_baseline(
    points: np.ndarray,
    normals: np.ndarray,
    k: int = 5,
    gripper: ParallelJawGripper = ParallelJawGripper(),
    mu: float = 0.5,
    num_candidates: int = 2000,
    nms_radius: float = 0.01,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """Model-free baseline on an observed (partial) cloud: antipodal pairs of observed points.

    For random observed points ``p`` (normal ``n`` toward the camera), pairs ``q`` with ``|q - p| <=
    max_width`` whose closing axis ``c = unit(q - p)`` lies in both friction cones (``|n_p·c|``,
    ``|n_q·c| >= cos atan(mu)``) are candidates; the approach is the camera ray to the centre made ⊥ to
    ``c`` (the palm comes from the camera). Score = the worse of the two cone cosines. Top ``k`` after
    greedy NMS (``nms_radius`` m) on the pairs' midpoints are kept. Each kept grasp then gets the
    contact distance the cloud shows for the pads (they are flat and meet a surface's widest point, not
    the sampled pair): the observed points in the pads' footprint within ``|q - p| / 2 +``
    :data:`PAD_EXTENT_MARGIN` of the midpoint along ``c``; width = their extent along ``c`` +
    :data:`VOXEL_EDGE`, ``position`` = the middle of that extent (the point midway between the jaws),
    so the grasp can be executed as given (strict check).

    Args:
        points, normals: (N, 3) observed sensor-frame points (camera at the origin) and unit normals.

    Returns:
        (k', 11) grasps (k' <= k), sensor frame, best first.
    """
    cloud = _baseline_cloud(points, normals, rng, min_points=2)
    if cloud is None:
        return np.zeros((0, GRASP_DIM), np.float32)
    pts, nrm, rng, tree = cloud
    cos_cone = np.cos(np.arctan(mu))
    seeds = rng.choice(len(pts), min(num_candidates, len(pts)), replace=False)
    cands = []
    for i in seeds:
        found = antipodal_partners(pts, nrm, tree, int(i), cos_cone, gripper)
        if found is None:
            continue
        nbr, w, c, s = found
        j = int(np.argmax(s))
        centre = (pts[i] + pts[nbr[j]]) / 2
        a = camera_approach(centre, c[j])
        if a is None:
            continue
        cands.append((s[j], centre, a, c[j], w[j]))
    grasps = _best_after_nms(cands, k, nms_radius)
    for g in grasps:  # the pads' contact distance the cloud shows around each kept pair
        g[0:3], g[9] = _pad_extent(pts, tree, g[0:3], g[3:6], g[6:9], g[9], g[9] / 2 + PAD_EXTENT_MARGIN, gripper)
    return grasps


def slab_grasp_baseline(
    points: np.ndarray,
    normals: np.ndarray,
    k: int = 5,
    gripper: ParallelJawGripper = ParallelJawGripper(),
    num_candidates: int = 300,
    nms_radius: float = 0.01,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """Model-free top-down baseline on an observed (partial) cloud, in the spirit of GPD's heuristics.

    For random observed points ``p`` (unit normal ``n`` toward the camera) the gripper approaches along
    ``-n``. The observed points in a cylinder of radius ``max_width / 2`` around that axis are
    projected on the plane ⊥ approach; their minor principal axis is the closing axis. The points in the
    finger slab (``|y| <= finger_width / 2``) give the width (their extent along closing, + 2 mm for the
    edge the 2 mm voxel thins away: the contact distance the cloud shows), the centre (midway across
    that extent, so ``position`` is the point midway between the jaws) and the depth (half their extent along the approach, clipped to 3 mm .. ``finger_depth - tip_margin``).
    Score = ``(1 - width / max_width) · |n · camera ray|``; candidates wider than ``max_width`` are
    dropped. Top ``k`` after greedy NMS (``nms_radius`` m). Inputs and result as in
    :func:`analytic_grasp_baseline`.
    """
    cloud = _baseline_cloud(points, normals, rng, min_points=8)
    if cloud is None:
        return np.zeros((0, GRASP_DIM), np.float32)
    pts, nrm, rng, tree = cloud
    cands = []
    for i in rng.choice(len(pts), min(num_candidates, len(pts)), replace=False):
        a = -nrm[i] / max(np.linalg.norm(nrm[i]), 1e-9)
        nbr = np.asarray(tree.query_ball_point(pts[i], gripper.max_width), np.int64)
        d = pts[nbr] - pts[i]
        along = d @ a
        radial = d - along[:, None] * a
        inside = np.linalg.norm(radial, axis=1) <= gripper.max_width / 2
        if inside.sum() < 5:
            continue
        r = radial[inside]
        e1 = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(a, e1)
        uv = np.c_[r @ e1, r @ e2]
        _, vecs = np.linalg.eigh(np.cov(uv.T) + 1e-12 * np.eye(2))
        minor = vecs[:, 0]
        c = minor[0] * e1 + minor[1] * e2
        y = np.cross(a, c)
        slab = np.abs(r @ y) <= gripper.finger_width / 2
        if slab.sum() < 3:
            continue
        xs = r[slab] @ c
        width = xs.max() - xs.min() + VOXEL_EDGE
        if width > gripper.max_width:
            continue
        depth = np.clip((along[inside][slab].max() - along[inside][slab].min()) / 2, 0.003, gripper.finger_depth - gripper.tip_margin)
        centre = pts[i] + (xs.max() + xs.min()) / 2 * c + depth * a
        ray = pts[i] / max(np.linalg.norm(pts[i]), 1e-9)
        cands.append(((1 - width / gripper.max_width) * abs(a @ ray), centre, a, c, width))
    return _best_after_nms(cands, k, nms_radius)
