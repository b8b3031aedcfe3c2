"""Procedural industrial parts as watertight open3d meshes (metres), seeded random dimensions and
poses, and a virtual depth camera that sees them as a line-side 3-D camera would (one side only,
Gaussian depth noise, dropouts).

Kinds (``PART_KINDS``): ``box``, ``plate`` (with round through-holes), ``l_profile``, ``u_profile`` (extruded polygons),
``shaft`` (stepped), ``tube``, ``flange`` (lathe profiles revolved about z). Dimensions are drawn
so most parts fit an 8 cm parallel-jaw gripper somewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d

from .io import CameraIntrinsics, PointCloud, depth_to_point_cloud

__all__ = [
    "PART_KINDS",
    "Part",
    "PartialView",
    "extrude_polygon",
    "holed_plate",
    "look_at",
    "make_part",
    "random_part",
    "random_rotation",
    "render_intensity",
    "render_partial_view",
    "revolve_profile",
]

PART_KINDS = ("box", "plate", "l_profile", "u_profile", "shaft", "tube", "flange")


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6.0)


def _finish(vertices: np.ndarray, triangles: np.ndarray) -> o3d.geometry.TriangleMesh:
    """Merge duplicates, drop degenerate faces, orient outward (positive volume), compute normals."""
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices.astype(np.float64)), o3d.utility.Vector3iVector(triangles.astype(np.int32)))
    mesh.merge_close_vertices(1e-9)
    mesh.remove_duplicated_vertices()
    mesh.remove_degenerate_triangles()
    mesh.remove_unreferenced_vertices()
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    if _signed_volume(v, f) < 0:
        mesh.triangles = o3d.utility.Vector3iVector(f[:, ::-1].copy())
    mesh.compute_vertex_normals()
    mesh.compute_triangle_normals()
    return mesh


def _ear_clip(poly: np.ndarray) -> np.ndarray:
    """Triangulate a simple counter-clockwise polygon ``(K, 2)`` → ``(K-2, 3)`` vertex indices."""
    idx = list(range(len(poly)))
    tris = []

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    guard = 0
    while len(idx) > 3 and guard < 10000:
        guard += 1
        for k in range(len(idx)):
            i0, i1, i2 = idx[k - 1], idx[k], idx[(k + 1) % len(idx)]
            a, b, c = poly[i0], poly[i1], poly[i2]
            if cross(a, b, c) <= 1e-15:
                continue  # reflex or collinear corner
            inside = any(
                cross(a, b, poly[j]) >= 0 and cross(b, c, poly[j]) >= 0 and cross(c, a, poly[j]) >= 0
                for j in idx
                if j not in (i0, i1, i2)
            )
            if not inside:
                tris.append((i0, i1, i2))
                idx.pop(k)
                break
        else:
            raise ValueError("polygon could not be triangulated (self-intersecting?)")
    tris.append(tuple(idx))
    return np.asarray(tris, np.int64)


def extrude_polygon(polygon, depth: float) -> o3d.geometry.TriangleMesh:
    """Extrude a simple polygon ``(K, 2)`` (x, y in m) along z from 0 to ``depth``: a watertight prism."""
    poly = np.asarray(polygon, np.float64)
    area = 0.5 * np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    if area < 0:
        poly = poly[::-1]
    k = len(poly)
    cap = _ear_clip(poly)
    v = np.concatenate([np.c_[poly, np.zeros(k)], np.c_[poly, np.full(k, depth)]])
    i = np.arange(k)
    j = (i + 1) % k
    sides = np.concatenate([np.c_[i, j, j + k], np.c_[i, j + k, i + k]])
    f = np.concatenate([cap[:, ::-1], cap + k, sides])
    return _finish(v, f)


def revolve_profile(profile, segments: int = 48) -> o3d.geometry.TriangleMesh:
    """Revolve a closed lathe profile ``(K, 2)`` of ``(r, z)`` (r ≥ 0, m) about the z axis: a watertight solid."""
    prof = np.asarray(profile, np.float64)
    if (prof[:, 0] < 0).any():
        raise ValueError("profile radii must be >= 0")
    k = len(prof)
    ang = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    v = np.stack([prof[None, :, 0] * np.cos(ang)[:, None], prof[None, :, 0] * np.sin(ang)[:, None], np.broadcast_to(prof[None, :, 1], (segments, k))], -1).reshape(-1, 3)
    s, p = np.meshgrid(np.arange(segments), np.arange(k), indexing="ij")
    a = s * k + p
    b = s * k + (p + 1) % k
    c = ((s + 1) % segments) * k + (p + 1) % k
    d = ((s + 1) % segments) * k + p
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return _finish(v, f)


def holed_plate(tiles_x: int, tiles_y: int, tile: float, thickness: float, hole_radius: float, holes, segments_per_side: int = 4) -> o3d.geometry.TriangleMesh:
    """A plate of ``tiles_x`` × ``tiles_y`` square tiles (side ``tile``, m) with a round through-hole of
    ``hole_radius`` centred in each tile listed in ``holes`` (``(i, j)`` pairs): a watertight mesh.

    Every tile's border carries the same ``4 * segments_per_side`` vertices, so solid tiles (a fan)
    and holed tiles (a ring to the hole's polygon) meet without T-junctions.
    """
    if not 0 < hole_radius < tile / 2:
        raise ValueError("need 0 < hole_radius < tile / 2")
    k = segments_per_side
    f = np.arange(k) / k
    unit = np.concatenate([np.c_[f, np.zeros(k)], np.c_[np.ones(k), f], np.c_[1 - f, np.ones(k)], np.c_[np.zeros(k), 1 - f]])  # CCW border
    holes = {tuple(h) for h in holes}
    verts, tris, walls = [], [], []  # walls: (a, b) 2-D edges with the solid on their left

    def add(points2d):
        base = sum(len(v) for v in verts)
        verts.append(np.asarray(points2d, np.float64))
        return base

    for i in range(tiles_x):
        for j in range(tiles_y):
            border = (np.array([i, j]) + unit) * tile
            centre = (np.array([i, j]) + 0.5) * tile
            n = len(border)
            b = add(border)
            nxt = (np.arange(n) + 1) % n
            if (i, j) in holes:
                ang = np.arctan2(border[:, 1] - centre[1], border[:, 0] - centre[0])
                circle = centre + hole_radius * np.c_[np.cos(ang), np.sin(ang)]
                c = add(circle)
                tris += [np.c_[b + np.arange(n), b + nxt, c + nxt], np.c_[b + np.arange(n), c + nxt, c + np.arange(n)]]
                walls += [(circle[(m + 1) % n], circle[m]) for m in range(n)]  # hole edges run clockwise
            else:
                c = add(centre[None])
                tris.append(np.c_[b + np.arange(n), b + nxt, np.full(n, c)])
            for m in range(n):  # border edges on the plate's outline
                a2, b2 = border[m], border[(m + 1) % n]
                mid = (a2 + b2) / 2
                if mid[0] < 1e-12 or mid[1] < 1e-12 or mid[0] > tiles_x * tile - 1e-12 or mid[1] > tiles_y * tile - 1e-12:
                    walls.append((a2, b2))
    v2 = np.concatenate(verts)
    cap = np.concatenate(tris)
    nv = len(v2)
    v = np.concatenate([np.c_[v2, np.zeros(nv)], np.c_[v2, np.full(nv, thickness)]])
    faces = [cap[:, ::-1], cap + nv]
    wall_v = np.array([[*a2, 0.0] for a2, _ in walls] + [[*b2, 0.0] for _, b2 in walls] + [[*b2, thickness] for _, b2 in walls] + [[*a2, thickness] for a2, _ in walls])
    w = len(walls)
    base = len(v)
    idx = base + np.arange(w)
    faces += [np.c_[idx, idx + w, idx + 2 * w], np.c_[idx, idx + 2 * w, idx + 3 * w]]
    return _finish(np.concatenate([v, wall_v]), np.concatenate(faces))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``(3, 3)`` rotation matrix."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return o3d.geometry.get_rotation_matrix_from_quaternion(q)


@dataclass
class Part:
    """A procedural part.

    Attributes:
        mesh: watertight open3d ``TriangleMesh`` in metres, posed in the world.
        kind: one of ``PART_KINDS``.
        dims: the dimensions drawn (m), by name.
        pose: ``(4, 4)`` part-to-world transform applied to the part centred at its bounding-box centre.
    """

    mesh: o3d.geometry.TriangleMesh
    kind: str
    dims: dict = field(default_factory=dict)
    pose: np.ndarray = field(default_factory=lambda: np.eye(4))


def make_part(kind: str, **dims: float) -> o3d.geometry.TriangleMesh:
    """Build one part of ``kind`` with the given dimensions (m), centred at its bounding-box centre, unposed."""
    if kind == "box":
        mesh = o3d.geometry.TriangleMesh.create_box(dims["sx"], dims["sy"], dims["sz"])
        mesh = _finish(np.asarray(mesh.vertices), np.asarray(mesh.triangles))
    elif kind == "plate":
        nx, ny, holes = int(dims["tiles_x"]), int(dims["tiles_y"]), int(dims.get("holes", 0))
        cells = [(i, j) for i in range(nx) for j in range(ny)]
        # holes in a fixed spread of tiles: every other tile, corners first
        order = sorted(cells, key=lambda c: ((c[0] + c[1]) % 2, -abs(c[0] - (nx - 1) / 2) - abs(c[1] - (ny - 1) / 2)))
        mesh = holed_plate(nx, ny, dims["tile"], dims["thickness"], dims.get("hole_radius", dims["tile"] / 4), order[:holes])
    elif kind == "l_profile":
        a, b, t = dims["leg_a"], dims["leg_b"], dims["thickness"]
        mesh = extrude_polygon([(0, 0), (a, 0), (a, t), (t, t), (t, b), (0, b)], dims["length"])
    elif kind == "u_profile":
        w, h, t = dims["width"], dims["height"], dims["thickness"]
        mesh = extrude_polygon([(0, 0), (w, 0), (w, h), (w - t, h), (w - t, t), (t, t), (t, h), (0, h)], dims["length"])
    elif kind == "shaft":
        r1, r2, l1, l2 = dims["radius_1"], dims["radius_2"], dims["length_1"], dims["length_2"]
        mesh = revolve_profile([(0, 0), (r1, 0), (r1, l1), (r2, l1), (r2, l1 + l2), (0, l1 + l2)])
    elif kind == "tube":
        ri, ro, length = dims["inner_radius"], dims["outer_radius"], dims["length"]
        mesh = revolve_profile([(ri, 0), (ro, 0), (ro, length), (ri, length)])
    elif kind == "flange":
        rb, rf, rh, tf, lh = dims["bore_radius"], dims["flange_radius"], dims["hub_radius"], dims["flange_thickness"], dims["hub_length"]
        mesh = revolve_profile([(rb, 0), (rf, 0), (rf, tf), (rh, tf), (rh, tf + lh), (rb, tf + lh)])
    else:
        raise ValueError(f"unknown part kind {kind!r}; expected one of {PART_KINDS}")
    return mesh.translate(-mesh.get_axis_aligned_bounding_box().get_center())


def _random_dims(kind: str, rng: np.random.Generator) -> dict:
    u = rng.uniform
    if kind == "box":
        return {"sx": u(0.02, 0.07), "sy": u(0.02, 0.07), "sz": u(0.02, 0.12)}
    if kind == "plate":
        tile = u(0.02, 0.035)
        nx, ny = int(rng.integers(2, 5)), int(rng.integers(1, 4))
        return {"tiles_x": nx, "tiles_y": ny, "tile": tile, "thickness": u(0.003, 0.012), "hole_radius": tile * u(0.15, 0.35), "holes": int(rng.integers(0, (nx * ny + 1) // 2 + 1))}
    if kind == "l_profile":
        return {"leg_a": u(0.02, 0.06), "leg_b": u(0.02, 0.06), "thickness": u(0.003, 0.008), "length": u(0.04, 0.15)}
    if kind == "u_profile":
        return {"width": u(0.03, 0.07), "height": u(0.02, 0.05), "thickness": u(0.003, 0.008), "length": u(0.04, 0.15)}
    if kind == "shaft":
        r1 = u(0.008, 0.03)
        return {"radius_1": r1, "radius_2": r1 * u(0.4, 0.85), "length_1": u(0.02, 0.08), "length_2": u(0.02, 0.08)}
    if kind == "tube":
        ro = u(0.01, 0.035)
        return {"inner_radius": ro * u(0.5, 0.85), "outer_radius": ro, "length": u(0.03, 0.12)}
    if kind == "flange":
        rb = u(0.005, 0.012)
        rh = rb + u(0.005, 0.015)
        return {"bore_radius": rb, "hub_radius": rh, "flange_radius": rh + u(0.01, 0.03), "flange_thickness": u(0.005, 0.012), "hub_length": u(0.01, 0.04)}
    raise ValueError(f"unknown part kind {kind!r}; expected one of {PART_KINDS}")


def random_part(rng: np.random.Generator | int | None = 0, kind: str | None = None, *, rotate: bool = True, translation_range: float = 0.0) -> Part:
    """A seeded random part: kind (uniform over ``PART_KINDS`` unless given), dimensions and pose.

    The part is centred, rotated uniformly (``rotate``) and shifted by up to ``translation_range`` m per axis.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    kind = kind or PART_KINDS[int(rng.integers(len(PART_KINDS)))]
    dims = _random_dims(kind, rng)
    mesh = make_part(kind, **dims)
    pose = np.eye(4)
    if rotate:
        pose[:3, :3] = random_rotation(rng)
    pose[:3, 3] = rng.uniform(-translation_range, translation_range, 3)
    mesh.transform(pose)
    return Part(mesh, kind, dims, pose)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """``(4, 4)`` camera-to-world pose for a camera at ``eye`` looking at ``target`` (z forward, x right, y down)."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:  # looking along up: pick another up
        x = np.cross(z, np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    t = np.eye(4)
    t[:3, 0], t[:3, 1], t[:3, 2], t[:3, 3] = x, y, z, eye
    return t


@dataclass
class PartialView:
    """What a depth camera sees of a scene.

    Attributes:
        depth: ``(H, W)`` float32 metres along the optical axis, 0 where there is no return.
        points: ``(N, 3)`` world-frame points from ``depth`` (noise and dropouts included).
        points_camera: ``(N, 3)`` the same points in the camera frame.
        camera_pose: ``(4, 4)`` camera-to-world.
        intrinsics: the camera.
    """

    depth: np.ndarray
    points: np.ndarray
    points_camera: np.ndarray
    camera_pose: np.ndarray
    intrinsics: CameraIntrinsics

    def cloud(self) -> PointCloud:
        """The world-frame points as a :class:`~.io.PointCloud`."""
        return PointCloud(self.points.copy(), source="<virtual depth camera>")


def render_partial_view(
    mesh: o3d.geometry.TriangleMesh | list,
    camera_pose: np.ndarray,
    intrinsics: CameraIntrinsics = CameraIntrinsics(300.0, 300.0, 159.5, 119.5, 320, 240),
    *,
    noise_std: float = 0.0005,
    dropout: float = 0.02,
    max_incidence_deg: float = 85.0,
    rng: np.random.Generator | int | None = 0,
) -> PartialView:
    """Raycast a depth image of ``mesh`` (or a list of meshes) from ``camera_pose`` (camera-to-world).

    Depth noise is Gaussian (``noise_std`` m along the optical axis); a ``dropout`` fraction of
    returns is lost at random, and returns at grazing incidence (> ``max_incidence_deg``) are lost too,
    as on real structured-light and ToF cameras. Points are back-projected from the depth image with
    :func:`~.io.depth_to_point_cloud`, exactly as a recorded depth frame would be.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scene = o3d.t.geometry.RaycastingScene()
    for m in mesh if isinstance(mesh, (list, tuple)) else [mesh]:
        scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(m))
    pose = np.asarray(camera_pose, np.float64)
    # one ray per pixel (u, v) through the same pinhole model depth_to_point_cloud inverts: d_cam = ((u-cx)/fx, (v-cy)/fy, 1)
    v, u = np.mgrid[0 : intrinsics.height, 0 : intrinsics.width].astype(np.float64)
    d_cam = np.stack([(u - intrinsics.cx) / intrinsics.fx, (v - intrinsics.cy) / intrinsics.fy, np.ones_like(u)], -1)
    d_world = d_cam @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], d_world.shape)
    rays = o3d.core.Tensor(np.concatenate([origins, d_world], -1).astype(np.float32))
    ans = scene.cast_rays(rays)
    depth = ans["t_hit"].numpy().astype(np.float64)  # t along d_cam (unit z) is the depth
    hit = np.isfinite(depth)
    depth = np.where(hit, depth, 0.0)
    normals = ans["primitive_normals"].numpy().astype(np.float64)
    dirs = d_world / np.linalg.norm(d_world, axis=-1, keepdims=True)
    cos_inc = np.abs((normals * dirs).sum(-1))
    valid = hit & (depth > 0) & (cos_inc >= np.cos(np.radians(max_incidence_deg)))
    valid &= rng.random(depth.shape) >= dropout
    depth = np.where(valid, depth + rng.normal(0.0, noise_std, depth.shape) if noise_std > 0 else depth, 0.0).astype(np.float32)
    depth[depth < 0] = 0.0
    if not (depth > 0).any():
        raise ValueError("render_partial_view: the camera sees nothing of the part (check the pose)")
    pc = depth_to_point_cloud(depth, intrinsics, name="<virtual depth camera>")
    pts_world = pc.points @ pose[:3, :3].T + pose[:3, 3]
    return PartialView(depth, pts_world, pc.points, pose, intrinsics)


def render_intensity(
    mesh: o3d.geometry.TriangleMesh | list,
    camera_pose: np.ndarray,
    intrinsics: CameraIntrinsics = CameraIntrinsics(300.0, 300.0, 159.5, 119.5, 320, 240),
    size: int | None = None,
    *,
    albedo: float = 0.8,
    ambient: float = 0.15,
    background: float = 40.0,
    noise_std: float = 2.0,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """The grey intensity image a depth camera's RGB/IR sensor sees of ``mesh`` (same pose and intrinsics
    as :func:`render_partial_view`).

    Lambertian shading under a light at the camera (a ring light): ``255 · albedo · (ambient + (1 -
    ambient) · |n · ray|)`` on hits, ``background`` elsewhere, plus Gaussian noise (``noise_std`` grey
    levels), clipped to uint8. With ``size`` the central ``min(H, W)`` square of the frame (where the
    part is: the camera looks at it) is area-resampled to ``size × size``: camera pixel ``(u, v)`` maps
    to ``((u - (W - s) / 2) · size / s, (v - (H - s) / 2) · size / s)`` with ``s = min(H, W)``.

    Returns:
        ``(H, W)`` or ``(size, size)`` uint8.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scene = o3d.t.geometry.RaycastingScene()
    for m in mesh if isinstance(mesh, (list, tuple)) else [mesh]:
        scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(m))
    pose = np.asarray(camera_pose, np.float64)
    v, u = np.mgrid[0 : intrinsics.height, 0 : intrinsics.width].astype(np.float64)
    d_cam = np.stack([(u - intrinsics.cx) / intrinsics.fx, (v - intrinsics.cy) / intrinsics.fy, np.ones_like(u)], -1)
    d_world = d_cam @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], d_world.shape)
    ans = scene.cast_rays(o3d.core.Tensor(np.concatenate([origins, d_world], -1).astype(np.float32)))
    hit = np.isfinite(ans["t_hit"].numpy())
    dirs = d_world / np.linalg.norm(d_world, axis=-1, keepdims=True)
    cos_inc = np.abs((ans["primitive_normals"].numpy().astype(np.float64) * dirs).sum(-1))
    img = np.where(hit, 255.0 * albedo * (ambient + (1.0 - ambient) * cos_inc), background)
    if size is not None:
        import torch
        import torch.nn.functional as F

        h, w = img.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = torch.from_numpy(np.ascontiguousarray(img[top : top + s, left : left + s]))[None, None]
        img = F.interpolate(crop, size=(int(size), int(size)), mode="area")[0, 0].numpy()
    if noise_std > 0:
        img = img + rng.normal(0.0, noise_std, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
