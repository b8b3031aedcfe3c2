"""Ground-truth antipodal grasps for a parallel-jaw gripper, computed from a part's mesh with
open3d's ``RaycastingScene``, and the same analytic test for judging predicted grasps.

Grasp array layout (``GRASP_DIM = 11`` float32 columns, one row per grasp, metres, the mesh frame):

====== ========= ==========================================================================
cols   name      meaning
====== ========= ==========================================================================
0:3    position  the point midway between the jaws (m); for a label (and after the lenient test)
                 also the midpoint of the two contacts
3:6    approach  unit vector the gripper moves along toward the part (palm → fingertips)
6:9    closing   unit vector from one finger to the other (⊥ approach)
9      width     distance between the contacts (m), ≤ the gripper's ``max_width``
10     score     friction margin in [0, 1]: 1 - (worst contact angle to the closing axis) /
                 atan(mu); 1 = both contact normals along the closing axis
====== ========= ==========================================================================

Gripper frame used by the collision test: x = closing, z = approach, y = z × x; the contacts
lie on the x axis (z = 0) ``tip_margin`` behind the fingertips. Each finger is a box
``finger_thickness`` (x) × ``finger_width`` (y) × ``finger_depth`` (z); the palm is a slab
``palm_thickness`` deep behind the fingers spanning the full opening. A grasp collides when
any sample of the palm, or of the region each finger sweeps while closing from
``max_width`` onto its contact, lies inside the part (ray-parity occupancy per connected
component, see :class:`GraspScene`; closed meshes, overlapping components allowed).

Lenient test (:func:`evaluate_grasps`, :func:`is_grasp_successful`, also the labeller's): close both
fingers from the gripper opened to ``max_width`` along the closing axis (a grid of rays over each finger's pad, ``resolution`` apart); each
finger stops at its pad's first touch, which is its contact (a flat pad closing on a curved or tilted
surface touches where that surface comes nearest, not necessarily on the centre line); the grasp
succeeds when both contacts exist with width ≤ ``max_width``, both contact normals lie
inside the friction cone (half-angle ``atan(mu)``) around the closing axis, and nothing
collides. It ignores the width column and re-centres the grasp between the contacts it finds, so it
asks whether a graspable spot lies at the predicted pose. :func:`antipodal_grasps` samples surface points, casts a ray inward (within the
friction cone of -normal) to find the opposite contact, spins approach directions around the
closing axis, and keeps what passes the same test.

Strict test (:func:`evaluate_grasps_strict`): the grasp is executed as predicted, with no
re-centring and its own width: the jaws open to ``width + clearance`` (1 cm) about the predicted
centre, the open gripper comes along ``approach`` from a ``standoff`` (5 cm) without any finger or
palm collision, the jaws close symmetrically about the predicted centre and both pads must touch
the part before they meet there, the predicted width must be within ``width_tolerance`` (5 mm) of
the contact distance, and both contact normals must lie inside the friction cone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import open3d as o3d

__all__ = [
    "GRASP_DIM",
    "STRICT_CLEARANCE",
    "STRICT_STANDOFF",
    "STRICT_WIDTH_TOLERANCE",
    "GraspScene",
    "ParallelJawGripper",
    "StrictGraspCheck",
    "antipodal_grasps",
    "evaluate_grasps",
    "evaluate_grasps_strict",
    "grasp_frames",
    "is_grasp_successful",
    "make_grasps",
]

GRASP_DIM = 11
#: spacing (m) of the rays over each finger pad that find its first touch in :func:`evaluate_grasps`
#: (finer than the thinnest part: sheet metal, a 1 mm ruler must not slip between the rays)
PAD_RAY_SPACING = 0.001
POSITION, APPROACH, CLOSING, WIDTH, SCORE = slice(0, 3), slice(3, 6), slice(6, 9), 9, 10


@dataclass(frozen=True)
class ParallelJawGripper:
    """A parallel-jaw gripper (metres); defaults are a Franka-Hand-like 8 cm stroke.

    Attributes:
        max_width: largest opening between the finger pads.
        finger_depth: finger length along the approach (how deep the part may sit between them).
        finger_width: pad size across the closing plane (y).
        finger_thickness: finger size along the closing axis (x).
        palm_thickness: depth of the palm slab behind the fingers.
        tip_margin: how far the contacts sit behind the fingertips (0 ≤ tip_margin < finger_depth).
        clearance: gap left between a closed finger and the contact surface in the collision test.
        min_width: narrowest graspable width.
    """

    max_width: float = 0.08
    finger_depth: float = 0.04
    finger_width: float = 0.02
    finger_thickness: float = 0.008
    palm_thickness: float = 0.01
    tip_margin: float = 0.005
    clearance: float = 0.001
    min_width: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.tip_margin < self.finger_depth:
            raise ValueError("need 0 <= tip_margin < finger_depth")
        if self.max_width <= 0:
            raise ValueError("max_width must be positive")


def make_grasps(position, approach, closing, width, score=None) -> np.ndarray:
    """Pack ``(G, 3)`` positions/approaches/closings and ``(G,)`` widths (scores) into ``(G, 11)``."""
    position = np.atleast_2d(np.asarray(position, np.float64))
    g = np.zeros((position.shape[0], GRASP_DIM), np.float32)
    g[:, POSITION] = position
    g[:, APPROACH] = _unit(np.atleast_2d(approach))
    g[:, CLOSING] = _unit(np.atleast_2d(closing))
    g[:, WIDTH] = width
    g[:, SCORE] = 0.0 if score is None else score
    return g


def grasp_frames(grasps: np.ndarray) -> np.ndarray:
    """``(G, 11)`` grasps → ``(G, 4, 4)`` poses: columns x = closing, y = approach × closing, z = approach, origin = position."""
    grasps = np.atleast_2d(grasps).astype(np.float64)
    x, z = grasps[:, CLOSING], grasps[:, APPROACH]
    y = np.cross(z, x)
    t = np.tile(np.eye(4), (len(grasps), 1, 1))
    t[:, :3, 0], t[:, :3, 1], t[:, :3, 2], t[:, :3, 3] = x, y, z, grasps[:, POSITION]
    return t


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class GraspScene:
    """A part mesh prepared for grasp queries: ray casting over all triangles, and occupancy that
    tolerates assemblies (one open3d ``RaycastingScene`` per connected component, OR-ed, since
    parity-based occupancy breaks where closed components overlap) and small holes (majority vote
    over 3 ray directions when the mesh is not watertight).

    Build once per mesh and pass it to :func:`evaluate_grasps` / :func:`is_grasp_successful`
    instead of the mesh when checking many grasps.
    """

    def __init__(self, mesh):
        if isinstance(mesh, o3d.t.geometry.TriangleMesh):
            mesh = mesh.to_legacy()
        m = o3d.geometry.TriangleMesh(mesh)
        m.remove_duplicated_vertices()
        m.remove_degenerate_triangles()
        if not m.has_triangles():
            raise ValueError("GraspScene: the mesh has no triangles")
        self.rays = o3d.t.geometry.RaycastingScene()
        self.rays.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(m))
        clusters, counts, _ = m.cluster_connected_triangles()
        clusters, tris = np.asarray(clusters), np.asarray(m.triangles)
        self.components = len(counts)
        self.watertight = bool(m.is_watertight())
        self.nsamples = 1 if self.watertight else 3
        self.bounds = []
        if self.components == 1:
            self.parts = [self.rays]
            self.bounds.append((m.get_min_bound() - 1e-6, m.get_max_bound() + 1e-6))
        else:
            self.parts = []
            for i in range(self.components):
                part = o3d.geometry.TriangleMesh(m.vertices, o3d.utility.Vector3iVector(tris[clusters == i]))
                part.remove_unreferenced_vertices()
                scene = o3d.t.geometry.RaycastingScene()
                scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(part))
                self.parts.append(scene)
                self.bounds.append((part.get_min_bound() - 1e-6, part.get_max_bound() + 1e-6))

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First hits of ``(R, 3)`` rays: distances ``(R,)`` (inf for a miss) and face normals ``(R, 3)``."""
        rays = o3d.core.Tensor(np.concatenate([origins, directions], axis=1).astype(np.float32))
        ans = self.rays.cast_rays(rays)
        return ans["t_hit"].numpy().astype(np.float64), ans["primitive_normals"].numpy().astype(np.float64)

    def occupied(self, points: np.ndarray) -> np.ndarray:
        """``(Q, 3)`` points → ``(Q,)`` bool, True inside the part."""
        out = np.zeros(len(points), bool)
        if len(points) == 0:
            return out
        for scene, (lo, hi) in zip(self.parts, self.bounds):
            near = np.flatnonzero(((points >= lo) & (points <= hi)).all(1) & ~out)  # outside a component's box is outside it
            if len(near):
                out[near] |= self._parity_vote(scene, points[near])
        return out


    # fixed, axis-skewed ray directions: deterministic labels (open3d's nsamples > 1 draws random ones)
    def _parity_vote(self, scene, points: np.ndarray) -> np.ndarray:
        dirs = np.array([[0.5773, 0.5774, 0.5773], [-0.7071, 0.1, 0.6999], [0.2, -0.9, 0.3873]])[: self.nsamples]
        votes = np.zeros(len(points), np.int64)
        for d in dirs:
            d = d / np.linalg.norm(d)
            rays = o3d.core.Tensor(np.concatenate([points, np.broadcast_to(d, points.shape)], 1).astype(np.float32))
            votes += scene.count_intersections(rays).numpy() % 2
        return votes * 2 > len(dirs)


def _scene(mesh) -> GraspScene:
    return mesh if isinstance(mesh, GraspScene) else GraspScene(mesh)


def _cast(scene: GraspScene, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return scene.cast(origins, directions)


def _occupied(scene: GraspScene, points: np.ndarray) -> np.ndarray:
    return scene.occupied(points)


def _grid(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, max(int(n), 2))


def evaluate_grasps(mesh, grasps: np.ndarray, gripper: ParallelJawGripper = ParallelJawGripper(), mu: float = 0.5, resolution: float = 0.005, chunk: int = 2048,
                    pad_spacing: float = PAD_RAY_SPACING):
    """Close the gripper at each grasp and test contacts, friction cones and collisions.

    Args:
        mesh: open3d ``TriangleMesh`` (legacy or tensor, metres, closed) or a prepared :class:`GraspScene`.
        grasps: ``(G, 11)`` grasp array (the width column is ignored: the fingers close from ``max_width``;
            :func:`evaluate_grasps_strict` takes the width and centre as given).
        gripper: the gripper geometry.
        mu: Coulomb friction coefficient (cone half-angle ``atan(mu)``).
        resolution: spacing (m) of the collision samples in the finger and palm volumes.
        pad_spacing: spacing (m) of the rays over each pad that find its first touch (at most ``resolution``).

    Returns:
        ``ok (G,)`` bool, ``width (G,)`` contact distance (nan without two contacts),
        ``score (G,)`` friction margin in [0, 1] (0 where not ok), ``position (G, 3)`` contact midpoint.
    """
    scene = _scene(mesh)
    grasps = np.atleast_2d(np.asarray(grasps, np.float64))
    outs = [_evaluate_chunk(scene, grasps[i : i + chunk], gripper, mu, resolution, pad_spacing) for i in range(0, len(grasps), chunk)]
    if not outs:
        return np.zeros(0, bool), np.zeros(0), np.zeros(0), np.zeros((0, 3))
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def _first_touch(scene: GraspScene, origins: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(G, R, 3)`` pad ray origins moving along ``(G, 3)`` directions → per grasp the nearest hit
    distance ``(G,)`` (inf when every ray misses) and the face normal there ``(G, 3)``."""
    g, r = origins.shape[:2]
    t, n = _cast(scene, origins.reshape(-1, 3), np.repeat(direction, r, 0))
    t, n = t.reshape(g, r), n.reshape(g, r, 3)
    j = np.argmin(t, 1)
    rows = np.arange(g)
    return t[rows, j], n[rows, j]


def _gripper_axes(grasps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(G, 11)`` grasps → centres ``c`` and the gripper frame ``x`` (closing, made ⊥ approach), ``y = z × x``,
    ``z`` (approach), each ``(G, 3)``."""
    c, z, x = grasps[:, POSITION], _unit(grasps[:, APPROACH]), _unit(grasps[:, CLOSING])
    x = _unit(x - (x * z).sum(1, keepdims=True) * z)  # closing ⊥ approach
    return c, x, np.cross(z, x), z


def _pad_touches(scene: GraspScene, c, x, y, z, half_open: np.ndarray, gr: ParallelJawGripper, pad_res: float):
    """Close both pads from ``±half_open (G,)`` along the closing axis toward the centre: a grid of rays
    ``pad_res`` apart over each pad face; each pad stops at its first touch anywhere on the pad.

    Returns ``t_pos, n_pos, t_neg, n_neg``: travel ``(G,)`` of the +x / -x pad to its first touch (inf
    when every ray misses) and the face normal there ``(G, 3)``."""
    z_lo, z_hi = gr.tip_margin - gr.finger_depth, gr.tip_margin
    py = (_grid(np.ceil(gr.finger_width / pad_res) + 1) - 0.5) * gr.finger_width
    pz = z_lo + _grid(np.ceil(gr.finger_depth / pad_res) + 1) * (z_hi - z_lo)
    PY, PZ = (a.reshape(-1) for a in np.meshgrid(py, pz, indexing="ij"))
    pad = PY[None, :, None] * y[:, None, :] + PZ[None, :, None] * z[:, None, :]  # (G, R, 3)
    h = half_open[:, None]
    t_pos, n_pos = _first_touch(scene, (c + h * x)[:, None] + pad, -x)
    t_neg, n_neg = _first_touch(scene, (c - h * x)[:, None] + pad, x)
    return t_pos, n_pos, t_neg, n_neg


def _friction_margin(n_pos: np.ndarray, n_neg: np.ndarray, x: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """Both contact normals inside the friction cone (half-angle ``atan(mu)``) around the closing axis ``x``:
    ``(G,)`` bool and the margin ``1 - worst angle / atan(mu)`` clipped to [0, 1]."""
    cos_cone = np.cos(np.arctan(mu))
    cos_pos, cos_neg = np.abs((n_pos * x).sum(1)), np.abs((n_neg * x).sum(1))
    inside = (cos_pos >= cos_cone) & (cos_neg >= cos_cone)
    worst = np.arccos(np.clip(np.minimum(cos_pos, cos_neg), -1.0, 1.0))
    return inside, np.clip(1.0 - worst / np.arctan(mu), 0.0, 1.0)


def _gripper_collides(scene: GraspScene, c, x, y, z, x_pos: np.ndarray, x_neg: np.ndarray, outer: np.ndarray,
                      gr: ParallelJawGripper, res: float, sweep: float = 0.0) -> np.ndarray:
    """``(G,)`` bool: does any collision sample of the fingers or the palm lie inside the part?

    Samples ``res`` apart in the gripper frame (x = closing, y, z = approach; contacts at z = 0): each
    finger spans ``|y| <= finger_width / 2`` and runs along x from its contact ``x_pos`` / ``x_neg``
    (``(G,)``, + the gripper's ``clearance``) to its open outer face ``±outer`` ``(G,)``, along z from
    its base ``tip_margin - finger_depth - sweep`` to its tip ``tip_margin``; the palm spans ``|x| <=
    outer`` and ``palm_thickness + sweep`` behind the finger base. ``sweep`` > 0 adds the volume the
    open gripper passes through while moving ``sweep`` metres along the approach onto the grasp.
    """
    g = len(c)
    if g == 0:
        return np.zeros(0, bool)
    outer = np.broadcast_to(np.asarray(outer, np.float64), (g,))
    z_base = gr.tip_margin - gr.finger_depth  # the fingers' base (palm side) at the grasp pose
    z_lo, z_hi = z_base - sweep, gr.tip_margin
    o_max = float(outer.max())
    fx, fy, fz = _grid(np.ceil(o_max / res) + 1), _grid(np.ceil(gr.finger_width / res) + 1), _grid(np.ceil((gr.finger_depth + sweep) / res) + 1)
    F = np.stack(np.meshgrid(fx, fy, fz, indexing="ij"), -1).reshape(-1, 3)  # unit-cube fractions
    px, pz = _grid(np.ceil(2 * o_max / res) + 1), _grid(np.ceil((gr.palm_thickness + sweep) / res) + 1)
    P = np.stack(np.meshgrid(px, fy, pz, indexing="ij"), -1).reshape(-1, 3)
    ys = (F[:, 1] - 0.5) * gr.finger_width
    zs = z_lo + F[:, 2] * (z_hi - z_lo)
    # (G, S) local coordinates per grasp
    lx_pos = (x_pos + gr.clearance)[:, None] + F[None, :, 0] * (outer - x_pos - gr.clearance)[:, None]
    lx_neg = (x_neg - gr.clearance)[:, None] - F[None, :, 0] * (outer + x_neg - gr.clearance)[:, None]
    pxs = -outer[:, None] + P[None, :, 0] * 2 * outer[:, None]
    pys, pzs = (P[:, 1] - 0.5) * gr.finger_width, z_base - P[:, 2] * (gr.palm_thickness + sweep)
    local_x = np.concatenate([lx_pos, lx_neg, pxs], 1)
    local_y = np.concatenate([np.broadcast_to(ys, lx_pos.shape), np.broadcast_to(ys, lx_neg.shape), np.broadcast_to(pys, pxs.shape)], 1)
    local_z = np.concatenate([np.broadcast_to(zs, lx_pos.shape), np.broadcast_to(zs, lx_neg.shape), np.broadcast_to(pzs, pxs.shape)], 1)
    pts = c[:, None] + local_x[..., None] * x[:, None] + local_y[..., None] * y[:, None] + local_z[..., None] * z[:, None]
    return _occupied(scene, pts.reshape(-1, 3)).reshape(g, -1).any(1)


def _evaluate_chunk(scene, grasps: np.ndarray, gr: ParallelJawGripper, mu: float, res: float, pad_spacing: float):
    g = len(grasps)
    c, x, y, z = _gripper_axes(grasps)
    half_open = np.full(g, gr.max_width / 2 + gr.clearance)
    # close each finger from the open position toward the centre; its first touch is its contact
    t_pos, n_pos, t_neg, n_neg = _pad_touches(scene, c, x, y, z, half_open, gr, min(res, pad_spacing))
    x_pos, x_neg = half_open - t_pos, t_neg - half_open  # contact coordinates along x
    width = x_pos - x_neg
    have = np.isfinite(width) & (t_pos <= 2 * half_open) & (t_neg <= 2 * half_open) & (width >= max(gr.min_width, 1e-6)) & (width <= gr.max_width)
    in_cone, margin = _friction_margin(n_pos, n_neg, x, mu)
    friction = have & in_cone
    score = np.where(friction, margin, 0.0)
    # finger regions run from the contact (+clearance) to the open finger's outer face
    idx = np.flatnonzero(friction)
    collide = np.zeros(g, bool)
    if len(idx):
        xp = np.where(np.isfinite(x_pos[idx]), x_pos[idx], 0.0)
        xn = np.where(np.isfinite(x_neg[idx]), x_neg[idx], 0.0)
        collide[idx] = _gripper_collides(scene, c[idx], x[idx], y[idx], z[idx], xp, xn, half_open[idx] + gr.finger_thickness, gr, res)
    ok = friction & ~collide
    centre = c + ((np.where(np.isfinite(x_pos), x_pos, 0) + np.where(np.isfinite(x_neg), x_neg, 0)) / 2)[:, None] * x
    return ok, np.where(have, width, np.nan), np.where(ok, score, 0.0), centre


def is_grasp_successful(mesh, grasp: np.ndarray, gripper: ParallelJawGripper = ParallelJawGripper(), mu: float = 0.5, resolution: float = 0.005) -> bool:
    """The analytic antipodal + collision test for one ``(11,)`` grasp (see :func:`evaluate_grasps`)."""
    ok, *_ = evaluate_grasps(mesh, np.asarray(grasp).reshape(1, -1), gripper, mu, resolution)
    return bool(ok[0])


#: defaults of the strict protocol (:func:`evaluate_grasps_strict`), metres
STRICT_CLEARANCE = 0.01
STRICT_WIDTH_TOLERANCE = 0.005
STRICT_STANDOFF = 0.05


class StrictGraspCheck(NamedTuple):
    """Per-grasp result of :func:`evaluate_grasps_strict`, every field ``(G,)``.

    Attributes:
        ok: the grasp passes every condition below.
        contact_width: distance between the two pads' contacts along the closing axis (nan unless ``touching``).
        score: friction margin in [0, 1] as in :func:`evaluate_grasps` (0 where not ok).
        offset: signed offset of the contacts' midpoint from the predicted centre along the closing
            axis (m; nan unless ``touching``): how far the closing jaws push the part (the lenient check
            re-centres the grasp by this much where it finds the same contacts).
        touching: both pads touch the part before the jaws meet at the predicted centre.
        in_cone: both contact normals inside the friction cone (False unless ``touching``).
        width_ok: a feasible predicted width (``max(0, min_width) < width <= max_width``) within ``width_tolerance``
            of ``contact_width``.
        collision_free: no finger or palm sample inside the part, from the stand-off to the closed grasp
            (False, not tested, where the predicted width is infeasible).
    """

    ok: np.ndarray
    contact_width: np.ndarray
    score: np.ndarray
    offset: np.ndarray
    touching: np.ndarray
    in_cone: np.ndarray
    width_ok: np.ndarray
    collision_free: np.ndarray


def evaluate_grasps_strict(mesh, grasps: np.ndarray, gripper: ParallelJawGripper = ParallelJawGripper(), mu: float = 0.5, *,
                           clearance: float = STRICT_CLEARANCE, width_tolerance: float = STRICT_WIDTH_TOLERANCE,
                           standoff: float = STRICT_STANDOFF, resolution: float = 0.005, chunk: int = 512,
                           pad_spacing: float = PAD_RAY_SPACING) -> StrictGraspCheck:
    """Execute each grasp exactly as predicted (pose and width) and test it: the strict protocol.

    :func:`evaluate_grasps` (lenient) opens the jaws to ``max_width`` whatever the prediction, lets
    each finger close independently onto the part and reports the centre between the contacts it
    found, so a grasp whose centre lies off the part, or whose width is wrong, can pass. Here the
    grasp is taken as given, in the gripper frame of the module docstring (x = closing, z = approach,
    origin = the predicted ``position``, the point midway between the jaws):

    1. **Opening.** The predicted width ``w`` must satisfy ``0 < w <= max_width`` (and ``>= min_width``); the jaws open
       symmetrically about the predicted centre to ``min(w + clearance, max_width)`` (pads at
       ``x = ±opening / 2``).
    2. **Approach.** The open gripper starts ``standoff`` metres back along ``-approach`` and moves
       along ``approach`` onto the grasp pose. Every collision sample (``resolution`` apart) of the
       volume the two fingers and the palm sweep on the way must lie outside the part (ray-parity
       occupancy of :class:`GraspScene`, as in :func:`evaluate_grasps`).
    3. **Closing.** The jaws close symmetrically about the predicted centre (no re-centring): each pad
       moves toward the centre along the closing axis, its first touch (a grid of rays
       ``pad_spacing`` apart over the pad) is its contact, and the jaws meet at the centre. Both pads
       must touch the part before they reach the centre, so the part lies between them and straddles
       the predicted centre. A part off the centre meets one pad first and is pushed along the
       closing axis until the other pad touches: by ``|offset|``, which conditions 1 and 4 bound
       by ``(clearance + width_tolerance) / 2``. The finger volumes swept while closing (contact +
       the gripper's ``clearance`` to the open outer face) are part of the collision test of step 2.
    4. **Width.** ``|w - contact_width| <= width_tolerance`` (contact_width = distance between the contacts).
    5. **Friction.** Both contact normals lie inside the friction cone (half-angle ``atan(mu)``)
       around the closing axis.

    Args:
        mesh: open3d ``TriangleMesh`` (legacy or tensor, metres, closed) or a prepared :class:`GraspScene`.
        grasps: ``(G, 11)`` grasp array; the width column is the predicted jaw width (m).
        gripper: the gripper geometry. mu: Coulomb friction coefficient.
        clearance: pre-grasp opening beyond the predicted width (m, default 1 cm).
        width_tolerance: largest ``|predicted width - contact distance|`` (m, default 5 mm).
        standoff: approach distance from the pre-grasp pose to the grasp pose (m, default 5 cm).
        resolution: spacing (m) of the collision samples. pad_spacing: spacing (m) of the pad rays
            (at most ``resolution``). chunk: grasps per batch of ray casts.

    Returns:
        :class:`StrictGraspCheck` (every field ``(G,)``).
    """
    scene = _scene(mesh)
    grasps = np.atleast_2d(np.asarray(grasps, np.float64))
    if clearance < 0 or width_tolerance < 0 or standoff < 0:
        raise ValueError("evaluate_grasps_strict: clearance, width_tolerance and standoff must be >= 0")
    outs = [_evaluate_strict_chunk(scene, grasps[i : i + chunk], gripper, mu, resolution, pad_spacing, clearance, width_tolerance, standoff)
            for i in range(0, len(grasps), chunk)]
    if not outs:
        e = np.zeros(0, bool)
        return StrictGraspCheck(e, np.zeros(0), np.zeros(0), np.zeros(0), e, e, e, e)
    return StrictGraspCheck(*(np.concatenate(parts) for parts in zip(*outs)))


def _evaluate_strict_chunk(scene, grasps: np.ndarray, gr: ParallelJawGripper, mu: float, res: float, pad_spacing: float,
                           clearance: float, width_tolerance: float, standoff: float) -> tuple[np.ndarray, ...]:
    c, x, y, z = _gripper_axes(grasps)
    w = grasps[:, WIDTH]
    feasible = np.isfinite(w) & (w > 0) & (w >= gr.min_width) & (w <= gr.max_width)
    half_open = np.where(feasible, np.minimum(np.where(feasible, w, 0.0) + clearance, gr.max_width) / 2, gr.max_width / 2)
    t_pos, n_pos, t_neg, n_neg = _pad_touches(scene, c, x, y, z, half_open, gr, min(res, pad_spacing))
    # symmetric closing: each pad travels at most to the predicted centre
    touching = feasible & (t_pos <= half_open) & (t_neg <= half_open)
    x_pos, x_neg = half_open - t_pos, t_neg - half_open  # contact coordinates along x (pos >= 0 >= neg when touching)
    width = np.where(touching, x_pos - x_neg, np.nan)
    touching &= width >= max(gr.min_width, 1e-6)
    width = np.where(touching, width, np.nan)
    in_cone, margin = _friction_margin(n_pos, n_neg, x, mu)
    in_cone &= touching
    width_ok = touching & (np.abs(w - np.where(touching, width, 0.0)) <= width_tolerance)
    # the closing sweep runs from each pad's contact, or from the centre where it meets none
    xp = np.clip(np.where(np.isfinite(x_pos), x_pos, 0.0), 0.0, half_open)
    xn = np.clip(np.where(np.isfinite(x_neg), x_neg, 0.0), -half_open, 0.0)
    collision_free = feasible.copy()
    idx = np.flatnonzero(feasible)
    if len(idx):
        collision_free[idx] = ~_gripper_collides(scene, c[idx], x[idx], y[idx], z[idx], xp[idx], xn[idx],
                                                 half_open[idx] + gr.finger_thickness, gr, res, sweep=standoff)
    ok = touching & in_cone & width_ok & collision_free
    offset = np.where(touching, (np.where(touching, x_pos, 0.0) + np.where(touching, x_neg, 0.0)) / 2, np.nan)
    return ok, width, np.where(ok, margin, 0.0), offset, touching, in_cone, width_ok, collision_free


def _perpendicular_basis(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors ``(G, 3)`` spanning the plane ⊥ each row of ``u``."""
    helper = np.where(np.abs(u[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = _unit(np.cross(u, helper))
    return e1, np.cross(u, e1)


def _sample_surface(mesh: o3d.geometry.TriangleMesh, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform seeded surface samples: points ``(num, 3)`` and their triangles' unit normals ``(num, 3)``."""
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.triangles, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    if area.sum() <= 0:
        raise ValueError("antipodal_grasps: the mesh has zero surface area")
    tri = rng.choice(len(f), num, p=area / area.sum())
    r1, r2 = rng.random(num), rng.random(num)
    s = np.sqrt(r1)
    w0, w1, w2 = 1 - s, s * (1 - r2), s * r2
    pts = w0[:, None] * a[tri] + w1[:, None] * b[tri] + w2[:, None] * c[tri]
    return pts, _unit(cross[tri])


def antipodal_grasps(
    mesh: o3d.geometry.TriangleMesh,
    gripper: ParallelJawGripper = ParallelJawGripper(),
    *,
    mu: float = 0.5,
    num_samples: int = 1000,
    num_approaches: int = 8,
    cone_sampling: float = 0.5,
    resolution: float = 0.005,
    max_grasps: int | None = None,
    seed: int = 0,
    recheck: bool = True,
) -> np.ndarray:
    """Ground-truth antipodal grasps of a part.

    Args:
        mesh: legacy open3d ``TriangleMesh`` in metres (watertight, for the collision test).
        gripper: the gripper geometry (``max_width``, ``finger_depth`` …).
        mu: friction coefficient; the cone half-angle is ``atan(mu)``.
        num_samples: surface points sampled (area-uniform) as first contacts.
        num_approaches: approach directions tried around each closing axis (random phase).
        cone_sampling: inward rays deviate from -normal by up to this fraction of the cone angle.
        resolution: collision sample spacing (m).
        max_grasps: keep the best-scoring this many (all when None).
        seed: the sampling seed.
        recheck: re-test the grasps that pass with pad rays ``resolution`` apart at the fine
            :data:`PAD_RAY_SPACING` of :func:`evaluate_grasps` (about 1 % fail there: an earlier first
            touch between the coarse rays); False leaves that to the caller (cheaper when it keeps few).

    Returns:
        ``(G, 11)`` float32 grasps sorted by score (layout in the module docstring); ``(0, 11)`` when none.
    """
    if not mesh.has_triangles():
        raise ValueError("antipodal_grasps: the mesh has no triangles")
    rng = np.random.default_rng(seed)
    scene = _scene(mesh)
    p, n = _sample_surface(mesh, num_samples, rng)
    eps = 1e-4
    # inward direction per point, robust to inconsistent triangle winding
    inside_minus = _occupied(scene, p - eps * n)
    inside_plus = _occupied(scene, p + eps * n)
    inward = np.where(inside_minus[:, None], -n, n)
    keep = inside_minus ^ inside_plus
    p, inward = p[keep], inward[keep]
    if len(p) == 0:
        return np.zeros((0, GRASP_DIM), np.float32)
    # perturb the inward ray inside the friction cone
    e1, e2 = _perpendicular_basis(inward)
    tilt = rng.uniform(0, cone_sampling * np.arctan(mu), len(p))
    phase = rng.uniform(0, 2 * np.pi, len(p))
    d = _unit(np.cos(tilt)[:, None] * inward + np.sin(tilt)[:, None] * (np.cos(phase)[:, None] * e1 + np.sin(phase)[:, None] * e2))
    origin = p + eps * d
    t_hit, _ = _cast(scene, origin, d)
    q = origin + np.where(np.isfinite(t_hit), t_hit, 0.0)[:, None] * d
    width = np.linalg.norm(q - p, axis=1)
    good = np.isfinite(t_hit) & (width <= gripper.max_width) & (width >= max(gripper.min_width, 1e-6))
    p, q = p[good], q[good]
    if len(p) == 0:
        return np.zeros((0, GRASP_DIM), np.float32)
    centre, closing = (p + q) / 2, _unit(q - p)
    b1, b2 = _perpendicular_basis(closing)
    angles = rng.uniform(0, 2 * np.pi, (len(p), 1)) + np.arange(num_approaches)[None, :] * (2 * np.pi / num_approaches)
    approach = np.cos(angles)[..., None] * b1[:, None] + np.sin(angles)[..., None] * b2[:, None]  # (M, K, 3)
    cand = make_grasps(
        np.repeat(centre, num_approaches, 0), approach.reshape(-1, 3), np.repeat(closing, num_approaches, 0), 0.0
    )
    # candidates' centre lines run through their sampled contacts (on the coarse pad grid), so the
    # labeller can afford pad rays at ``resolution``; kept labels are re-checked at the fine spacing
    ok, w, score, pos = evaluate_grasps(scene, cand, gripper, mu, resolution, pad_spacing=resolution)
    if recheck and ok.any():
        idx = np.flatnonzero(ok)
        ok[idx], w[idx], score[idx], pos[idx] = evaluate_grasps(scene, cand[idx], gripper, mu, resolution)
    grasps = cand[ok]
    grasps[:, POSITION] = pos[ok]
    grasps[:, WIDTH] = w[ok]
    grasps[:, SCORE] = score[ok]
    order = np.argsort(-grasps[:, SCORE], kind="stable")
    grasps = grasps[order]
    return grasps if max_grasps is None else grasps[:max_grasps]
