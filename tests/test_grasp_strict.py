"""The strict grasp check (the grasp executed as predicted: its centre, closing axis and width, no
re-centring) against the lenient one, with known answers on analytic boxes."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest

from lineside.pointcloud.grasp_dataset import (
    VOXEL_EDGE,
    analytic_grasp_baseline,
    evaluate_topk,
    grasp_success,
    slab_grasp_baseline,
)
from lineside.pointcloud.grasp_labels import (
    STRICT_CLEARANCE,
    STRICT_WIDTH_TOLERANCE,
    GraspScene,
    ParallelJawGripper,
    antipodal_grasps,
    evaluate_grasps,
    evaluate_grasps_strict,
    make_grasps,
)
from lineside.pointcloud.io import PointCloud
from lineside.pointcloud.parts import look_at, render_partial_view
from lineside.pointcloud.preprocess import preprocess_cloud

GRIPPER = ParallelJawGripper(max_width=0.08)  # 4 cm fingers, contacts 5 mm behind the tips, 1 cm palm
SIDE = 0.03  # the box's size along the closing axis (x)
DEPTH = 0.045  # and along the approach (z); its faces at z = ±22.5 mm lie between the pads' 1 mm ray rows


def _box(sx: float, sy: float, sz: float, at=(0.0, 0.0, 0.0)) -> o3d.geometry.TriangleMesh:
    return o3d.geometry.TriangleMesh.create_box(sx, sy, sz).translate([at[0] - sx / 2, at[1] - sy / 2, at[2] - sz / 2])


@pytest.fixture(scope="module")
def box() -> GraspScene:
    """3 × 3 cm across, 4.5 cm along the approach (z), centred at the origin: a grasp at the origin closing
    along x, approaching along +z, holds it with the palm 1.25 cm clear of its back face."""
    return GraspScene(_box(SIDE, SIDE, DEPTH))


def _grasp(position=(0.0, 0.0, 0.0), width=SIDE, approach=(0.0, 0.0, 1.0), closing=(1.0, 0.0, 0.0)) -> np.ndarray:
    return make_grasps(position, approach, closing, width)


def _strict(scene, g, **kw):
    return evaluate_grasps_strict(scene, g, GRIPPER, **kw)


def _lenient_ok(scene, g) -> bool:
    return bool(evaluate_grasps(scene, g, GRIPPER)[0][0])


def test_centred_grasp_with_its_width_passes_both(box):
    g = _grasp()
    r = _strict(box, g)
    assert r.ok[0] and r.touching[0] and r.in_cone[0] and r.width_ok[0] and r.collision_free[0]
    assert r.contact_width[0] == pytest.approx(SIDE, abs=1e-5)
    assert r.offset[0] == pytest.approx(0.0, abs=1e-6) and r.score[0] == pytest.approx(1.0)
    assert _lenient_ok(box, g)


def test_grasp_moved_off_the_part_fails_strict_but_lenient_recentres_it(box):
    # centre 5 mm beyond the box's +x face: the lenient check opens to max_width, finds both faces and
    # reports the grasp moved back to the box's centre; the strict jaws (4 cm open about the given
    # centre) come down with the -x finger inside the box, and the +x pad would pass the centre
    g = _grasp(position=(SIDE / 2 + 0.005, 0.0, 0.0))
    ok, width, _, centre = evaluate_grasps(box, g, GRIPPER)
    assert ok[0] and width[0] == pytest.approx(SIDE, abs=1e-5)
    np.testing.assert_allclose(centre[0], 0.0, atol=1e-6)  # the re-centring
    r = _strict(box, g)
    assert not r.ok[0] and not r.collision_free[0] and not r.touching[0]


def test_thin_part_centre_off_the_part_fails_strict_without_a_collision():
    # a 4 mm plate and a grasp centred 4 mm beside it: the jaws (opened to 4 mm + 1 cm) clear it on the
    # way down, but the far pad would have to travel past the predicted centre to reach it
    plate = GraspScene(_box(0.004, 0.05, 0.05))
    g = _grasp(position=(0.004, 0.0, 0.0), width=0.004)
    assert _lenient_ok(plate, g)
    r = _strict(plate, g)
    assert not r.ok[0] and not r.touching[0] and r.collision_free[0]
    assert _strict(plate, _grasp(width=0.004)).ok[0]


def test_small_offset_inside_the_clearance_passes_and_is_reported(box):
    r = _strict(box, _grasp(position=(0.003, 0.0, 0.0)))
    assert r.ok[0]
    assert r.offset[0] == pytest.approx(-0.003, abs=1e-5)  # the contacts' midpoint lies 3 mm toward -x


def test_width_halved_fails_strict(box):
    g = _grasp(width=SIDE / 2)  # jaws open to 2.5 cm < 3 cm: the fingers come down on the box
    assert _lenient_ok(box, g)  # the lenient check ignores the width
    r = _strict(box, g)
    assert not r.ok[0] and not r.collision_free[0]


def test_width_beyond_the_tolerance_fails_strict(box):
    wide = _strict(box, _grasp(width=0.07))
    assert not wide.ok[0] and not wide.width_ok[0]
    assert wide.touching[0] and wide.in_cone[0] and wide.collision_free[0]  # only the width is wrong
    assert wide.contact_width[0] == pytest.approx(SIDE, abs=1e-5)
    tol = STRICT_WIDTH_TOLERANCE
    assert _strict(box, _grasp(width=SIDE + tol - 0.001)).ok[0]
    assert not _strict(box, _grasp(width=SIDE + tol + 0.001)).ok[0]
    assert _strict(box, _grasp(width=SIDE + tol + 0.001), width_tolerance=tol + 0.002).ok[0]
    # a width the gripper cannot open to, or none at all
    for w in (GRIPPER.max_width + 0.01, 0.0, np.nan):
        assert not _strict(box, _grasp(width=w)).ok[0]


def test_approach_through_the_part_fails():
    bar = GraspScene(_box(SIDE, SIDE, 0.2))  # 20 cm along the approach: the palm ends up inside it
    g = _grasp()
    r = _strict(bar, g)
    assert not r.ok[0] and not r.collision_free[0] and r.touching[0] and r.width_ok[0]
    assert not _lenient_ok(bar, g)


def test_approach_path_is_checked_from_the_standoff():
    # a plate 2.5-3.5 cm behind the closed palm: the grasp pose itself is free (lenient passes), the
    # way in from the 5 cm stand-off crosses the plate
    parts = _box(SIDE, SIDE, DEPTH) + _box(0.1, 0.1, 0.01, at=(0.0, 0.0, -0.075))
    scene = GraspScene(parts)
    g = _grasp()
    assert _lenient_ok(scene, g)
    r = _strict(scene, g)
    assert not r.ok[0] and not r.collision_free[0] and r.touching[0] and r.width_ok[0] and r.in_cone[0]
    assert _strict(scene, g, standoff=0.02).ok[0]  # a shorter approach stays in front of the plate


def test_friction_cone_applies(box):
    tilt = np.radians(20)
    # approach along y, closing tilted 20° out of x: each pad touches a face with a corner first
    g = _grasp(width=SIDE / np.cos(tilt) + GRIPPER.finger_width * np.tan(tilt), approach=(0.0, 1.0, 0.0),
               closing=(np.cos(tilt), 0.0, np.sin(tilt)))
    assert _strict(box, g).ok[0]  # 20° < atan(0.5)
    r = evaluate_grasps_strict(box, g, GRIPPER, mu=0.1)  # 20° > atan(0.1)
    assert not r.ok[0] and not r.in_cone[0] and r.touching[0]


def test_result_is_invariant_to_a_rigid_motion():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q * np.sign(np.linalg.det(q)), [0.1, -0.2, 0.4]
    mesh = _box(SIDE, SIDE, DEPTH)
    g = np.concatenate([_grasp(), _grasp(position=(0.02, 0, 0)), _grasp(width=SIDE / 2), _grasp(width=0.07), _grasp(position=(0.003, 0, 0))])
    moved = g.copy()
    moved[:, 0:3] = g[:, 0:3] @ pose[:3, :3].T + pose[:3, 3]
    moved[:, 3:6], moved[:, 6:9] = g[:, 3:6] @ pose[:3, :3].T, g[:, 6:9] @ pose[:3, :3].T
    a = _strict(GraspScene(mesh), g)
    b = _strict(GraspScene(o3d.geometry.TriangleMesh(mesh).transform(pose)), moved)
    np.testing.assert_array_equal(a.ok, [True, False, False, False, True])
    for field in ("ok", "touching", "in_cone", "width_ok", "collision_free"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_allclose(a.contact_width, b.contact_width, atol=1e-5)


def test_labels_executed_as_given_pass_strict():
    cube = _box(0.04, 0.04, 0.04)
    labels = antipodal_grasps(cube, GRIPPER, num_samples=200, seed=1)[:40]
    r = evaluate_grasps_strict(cube, labels, GRIPPER)
    assert r.ok.all()  # centred on their contacts, with their contact distance as width
    np.testing.assert_allclose(r.contact_width, labels[:, 9], atol=1e-5)
    np.testing.assert_allclose(r.offset, 0.0, atol=1e-5)


def test_grasp_success_switch(box):
    # five ranked grasps of one sample: centred, off the part, width halved, width too large, approach through
    grasps = np.concatenate([_grasp(), _grasp(position=(0.02, 0, 0)), _grasp(width=SIDE / 2), _grasp(width=0.07),
                             _grasp(position=(0, 0, -0.05))])[None]
    pos, app, clo, width = grasps[..., 0:3], grasps[..., 3:6], grasps[..., 6:9], grasps[..., 9]
    lenient = grasp_success(pos, app, clo, [box], gripper=GRIPPER)
    strict = grasp_success(pos, app, clo, [box], gripper=GRIPPER, width=width, protocol="strict")
    np.testing.assert_array_equal(lenient[0], [True, True, True, True, False])
    np.testing.assert_array_equal(strict[0], [True, False, False, False, False])
    score = np.array([[0.0, 1, 1, 1, 1]])  # an exhausted pick fails whatever its geometry
    assert not grasp_success(pos, app, clo, [box], score, GRIPPER, width=width, protocol="strict")[0, 0]
    looser = grasp_success(pos, app, clo, [box], gripper=GRIPPER, width=width, protocol="strict", width_tolerance=0.05)
    np.testing.assert_array_equal(looser[0], [True, False, False, True, False])
    res = evaluate_topk(pos, app, clo, [box], ks=(1, 5), gripper=GRIPPER, width=width, protocol="strict")
    assert res == {"top1": 1.0, "top5": 1.0, "precision": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="width"):
        grasp_success(pos, app, clo, [box], protocol="strict")
    with pytest.raises(ValueError, match="protocol"):
        grasp_success(pos, app, clo, [box], protocol="tight")
    assert STRICT_CLEARANCE == 0.01


def test_slab_baseline_widths_hold_when_executed_as_given():
    # a rod (2.4 cm across, 10 cm long) lying under a depth camera: the slab rule's grasps carry the
    # contact distance the cloud shows as their width, and they hold when executed as given
    rod = o3d.geometry.TriangleMesh.create_cylinder(radius=0.012, height=0.1, resolution=48, split=1)
    rod.rotate(o3d.geometry.get_rotation_matrix_from_xyz((np.pi / 2, 0.0, 0.0)), center=(0, 0, 0))  # axis along y
    rod.compute_triangle_normals()
    cam = look_at(np.array([0.0, 0.05, 0.4]))
    view = render_partial_view(rod, cam, noise_std=0.0, dropout=0.0, rng=np.random.default_rng(0))
    ready = preprocess_cloud(PointCloud(view.points_camera.copy(), source="rod"), 1024, rng=0)
    m = ready.mask
    pts = ready.points[m] * ready.transform.scale + ready.transform.center
    g = slab_grasp_baseline(pts, ready.normals[m], k=5, gripper=GRIPPER, rng=0)
    assert len(g) == 5 and (np.abs(g[:, 9] - 0.024) < 0.004).all()
    r = evaluate_grasps_strict(o3d.geometry.TriangleMesh(rod).transform(np.linalg.inv(cam)), g, GRIPPER)
    assert r.ok.all()
    assert np.abs(g[:, 9] - r.contact_width).max() <= STRICT_WIDTH_TOLERANCE


def test_analytic_baseline_width_is_its_contact_distance():
    # the two 2.4 × 2.4 cm faces of a 2 cm thick box seen by the camera at the origin: antipodal pairs
    # across it give grasps midway between the faces with the faces' distance (+ the voxel edge) as width
    rng = np.random.default_rng(0)
    y, z = rng.uniform(-0.012, 0.012, (2, 400))
    side = np.where(np.arange(400) < 200, -0.01, 0.01)
    pts = np.c_[side, y, 0.4 + z]
    normals = np.c_[-np.sign(side), np.zeros(400), np.zeros(400)]
    g = analytic_grasp_baseline(pts, normals, k=5, gripper=GRIPPER, rng=0)
    assert len(g) == 5
    np.testing.assert_allclose(np.abs(g[:, 6]), 1.0, atol=1e-3)  # closing across the faces
    np.testing.assert_allclose(g[:, 9], 0.02 + VOXEL_EDGE, atol=5e-4)  # a closing axis tilted by up to 2.5° widens the extent
    np.testing.assert_allclose(g[:, 0], 0.0, atol=1e-4)
    box = _box(0.02, 0.03, 0.03, at=(0.0, 0.0, 0.4))
    r = evaluate_grasps_strict(box, g, GRIPPER)
    assert r.ok.all()
