"""The candidate-then-score grasp planner: candidates from an observed cloud (with widths read from the
cloud), their crops and features, and the small PointNet ranker (training, ranking, save/load, errors)."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch
from lineside.fusion.grasp_ranker import (
    GraspRanker,
    GraspRankerConfig,
    rank_candidates,
)
from lineside.fusion.grasp_ranker_train import train_ranker
from lineside.pointcloud.grasp_candidates import (
    CROP_CHANNELS,
    FEATURE_NAMES,
    SOURCE_ANTIPODAL,
    SOURCE_SLAB,
    CandidateConfig,
    candidate_crops,
    candidate_features,
    grasp_candidates,
)
from lineside.pointcloud.grasp_labels import ParallelJawGripper, evaluate_grasps_strict

GRIPPER = ParallelJawGripper(max_width=0.08)
SMALL = CandidateConfig(num_antipodal_seeds=120, num_slab_seeds=60, max_candidates=128)


@pytest.fixture(scope="module")
def box_view():
    """A 3 × 5 × 4 cm box 0.4 m in front of the sensor, its near face (z) and both 5 × 4 cm side faces (±x)
    observed (as two cameras beside each other would see them; 0.3 mm noise): the cloud (sensor frame,
    metres), its normals (outward) and the box mesh in the same frame."""
    rng = np.random.default_rng(0)
    sx, sy, sz, z0 = 0.03, 0.05, 0.04, 0.4
    u, v = rng.uniform(-0.5, 0.5, (2, 900))
    face = np.arange(900) % 3
    pts = np.where(face[:, None] == 0, np.c_[u * sx, v * sy, np.full(900, z0 - sz / 2)],
                   np.c_[np.where(face == 1, sx / 2, -sx / 2), v * sy, z0 + u * sz])
    nrm = np.where(face[:, None] == 0, [0.0, 0.0, -1.0], np.c_[np.where(face == 1, 1.0, -1.0), np.zeros(900), np.zeros(900)])
    pts = pts + rng.normal(0, 0.0003, pts.shape)
    box = o3d.geometry.TriangleMesh.create_box(sx, sy, sz).translate([-sx / 2, -sy / 2, z0 - sz / 2])
    box.compute_triangle_normals()
    return pts, nrm, box


def test_candidates_on_a_box_include_a_centred_antipodal_grasp_that_passes_strict(box_view):
    pts, nrm, mesh = box_view
    cand = grasp_candidates(pts, nrm, GRIPPER, SMALL, rng=0)
    assert 10 <= len(cand) <= SMALL.max_candidates
    assert set(np.unique(cand.source)) == {SOURCE_ANTIPODAL, SOURCE_SLAB}
    g = cand.grasps
    assert np.isfinite(g).all() and ((g[:, 9] > 0) & (g[:, 9] <= GRIPPER.max_width)).all()
    np.testing.assert_allclose(np.abs((g[:, 3:6] * g[:, 6:9]).sum(1)), 0.0, atol=1e-5)  # closing ⊥ approach
    r = evaluate_grasps_strict(mesh, g, GRIPPER)
    assert r.ok.any()
    # a passing antipodal grasp across the 3 cm (or 5 cm) sides, centred on the box's middle plane
    box_centre = np.asarray(mesh.get_axis_aligned_bounding_box().get_center())
    hit = r.ok & (cand.source == SOURCE_ANTIPODAL)
    assert hit.any()
    off_axis = np.abs(((g[hit, 0:3] - box_centre) * g[hit, 6:9]).sum(1))  # centre offset along its closing axis
    assert off_axis.min() < 0.004
    assert (np.abs(g[hit, 9] - r.contact_width[hit]) <= 0.005).all()


def test_crops_and_features_are_in_the_gripper_frame(box_view):
    pts, nrm, _ = box_view
    cand = grasp_candidates(pts, nrm, GRIPPER, SMALL, rng=0)
    crops = candidate_crops(pts, nrm, cand.grasps, 64, GRIPPER)
    feats = candidate_features(pts, nrm, cand.grasps, cand.source, GRIPPER)
    assert crops.shape == (len(cand), 64, CROP_CHANNELS) and feats.shape == (len(cand), len(FEATURE_NAMES))
    assert np.isfinite(crops).all() and np.isfinite(feats).all()
    assert (np.abs(crops[..., :3]) <= 1.0 + 1e-6).all()  # positions inside the crop box
    np.testing.assert_allclose(np.linalg.norm(crops[..., 3:6], axis=-1), 1.0, atol=1e-4)  # rotated unit normals
    np.testing.assert_allclose(feats[:, 0], cand.grasps[:, 9] / GRIPPER.max_width, rtol=1e-5)
    assert (feats[:, 2] + feats[:, 3] == 1).all()
    # the same scene rotated (cloud and grasps together) gives the same crops: they live in the gripper frame
    rot = o3d.geometry.get_rotation_matrix_from_xyz((0.3, -0.2, 0.5))
    g2 = cand.grasps.copy()
    g2[:, 0:3], g2[:, 3:6], g2[:, 6:9] = g2[:, 0:3] @ rot.T, g2[:, 3:6] @ rot.T, g2[:, 6:9] @ rot.T
    crops2 = candidate_crops(pts @ rot.T, nrm @ rot.T, g2, 64, GRIPPER)
    np.testing.assert_allclose(crops2, crops, atol=1e-4)


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops where a pass has points between the jaws (|x| small) and a fail has them in a finger's path."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    crops = rng.uniform(-1, 1, (n, 32, CROP_CHANNELS)).astype(np.float32)
    crops[y, :, 0] *= 0.2
    crops[~y, :, 0] = np.sign(crops[~y, :, 0]) * rng.uniform(0.6, 1.0, (int((~y).sum()), 32))
    feats = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
    return crops, feats, y


def test_ranker_learns_a_separable_set_and_round_trips(tmp_path):
    crops, feats, y = _separable(320, 0)
    cfg = GraspRankerConfig(crop_points=32, widths=(16, 32), hidden=32)
    ranker = train_ranker(crops, feats, y, config=cfg, epochs=8, batch_size=64, lr=5e-3, progress=False)
    tc, tf, ty = _separable(200, 1)
    p = ranker.score(tc, tf)
    assert p.shape == (200,) and ((p >= 0) & (p <= 1)).all()
    assert p[ty].min() > p[~ty].max() - 0.2 and ((p > 0.5) == ty).mean() > 0.95
    grasps = np.zeros((200, 11), np.float32)
    grasps[:, 0] = np.arange(200) * 0.02  # centres far apart: NMS keeps all
    order = rank_candidates(ranker, tc, tf, grasps, k=5)
    assert len(order) == 5 and ty[order].all()
    path = ranker.save(tmp_path / "ranker.pt")
    loaded = GraspRanker.load(path)
    assert loaded.config == ranker.config and loaded.candidates == ranker.candidates and loaded.gripper == ranker.gripper
    np.testing.assert_array_equal(loaded.score(tc, tf), p)


def test_suggest_end_to_end_on_a_box(box_view, tmp_path):
    pts, nrm, _ = box_view
    torch.manual_seed(0)
    ranker = GraspRanker(GraspRankerConfig(crop_points=32, widths=(8, 8), hidden=8), SMALL, GRIPPER)
    g = GraspRanker.load(ranker.save(tmp_path / "r.pt")).suggest(pts, nrm, k=3)
    assert g.shape == (3, 11) and (np.diff(g[:, 10]) <= 0).all() and ((g[:, 10] >= 0) & (g[:, 10] <= 1)).all()
    assert (np.linalg.norm(g[:, None, 0:3] - g[None, :, 0:3], axis=-1) + np.eye(3)).min() > ranker.config.nms_radius


@pytest.mark.parametrize(
    "points, match",
    [
        (np.zeros((0, 3)), "empty"),
        (np.full((50, 3), np.nan), "NaN"),
        (np.ones((50, 3)), "degenerate"),
        (np.random.default_rng(0).normal(size=(3, 3)), "at least"),
        (np.zeros((10, 2)), r"\(N, 3\)"),
    ],
)
def test_bad_clouds_give_clear_errors(points, match):
    with pytest.raises(ValueError, match=match):
        grasp_candidates(points, np.zeros((len(points), 3)) if points.ndim == 2 and points.shape[1] == 3 else None, GRIPPER)


def test_training_and_loading_errors(tmp_path):
    crops, feats, y = _separable(20, 0)
    with pytest.raises(ValueError, match="passing and failing"):
        train_ranker(crops, feats, np.ones(20, bool), progress=False)
    with pytest.raises(ValueError, match="feature rows"):
        train_ranker(crops, feats[:5], y, progress=False)
    bad = tmp_path / "not_a_ranker.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not_a_ranker.pt: not a grasp ranker"):
        GraspRanker.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GraspRanker.load(tmp_path / "missing.pt")
