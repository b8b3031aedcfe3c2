"""Grasp datasets: sample layout, seeding, the npz cache, labels on the part in the camera frame, the
visibility rule, collate, and the decoded-grasp round trip back onto the mesh in metres."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch

from lineside.pointcloud.grasp_dataset import (
    GraspViewConfig,
    PartGraspDataset,
    WorkshopToolsDataset,
    analytic_grasp_baseline,
    collate,
    evaluate_topk,
    load_mesh,
)
from lineside.pointcloud.grasp_labels import GraspScene, evaluate_grasps

CFG = GraspViewConfig(num_points=128, num_samples=120, num_approaches=4, max_grasps=64)
KEYS = {"points", "point_mask", "features", "grasps", "center", "scale", "part_id", "mesh"}


def _to_sensor(s: dict) -> np.ndarray:
    g = s["grasps"].astype(np.float64).copy()
    g[:, 0:3] = g[:, 0:3] * float(s["scale"]) + s["center"]
    g[:, 9] *= float(s["scale"])
    return g


def _surface_distance(mesh, pts: np.ndarray) -> np.ndarray:
    return GraspScene(mesh).rays.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()


def test_sample_layout_and_seeding():
    ds = PartGraspDataset(3, CFG, seed=7)
    s = ds[0]
    assert set(s) == KEYS
    assert s["points"].shape == (128, 3) and s["points"].dtype == np.float32
    assert s["point_mask"].shape == (128,) and s["point_mask"].dtype == bool and s["point_mask"].any()
    assert s["features"].shape == (128, 3)
    np.testing.assert_allclose(np.linalg.norm(s["features"][s["point_mask"]], axis=1), 1.0, atol=1e-4)
    assert s["grasps"].ndim == 2 and s["grasps"].shape[1] == 11 and s["grasps"].dtype == np.float32
    assert s["center"].shape == (3,) and s["scale"].shape == () and float(s["scale"]) > 0
    assert np.linalg.norm(s["points"][s["point_mask"]], axis=1).max() <= 1.0 + 1e-5  # normalised: unit ball
    again = PartGraspDataset(3, CFG, seed=7)[0]
    for k in KEYS - {"mesh", "part_id"}:
        np.testing.assert_array_equal(s[k], again[k])
    assert s["mesh"] == again["mesh"]
    other = PartGraspDataset(3, CFG, seed=8)[0]
    assert not np.array_equal(other["points"], s["points"])
    assert not np.array_equal(ds[1]["points"], s["points"])


def test_cache_hit_returns_identical_arrays(tmp_path, monkeypatch):
    first = PartGraspDataset(2, CFG, seed=3, cache_dir=tmp_path)
    s = first[1]
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 1 and files[0].name == "1.npz"
    second = PartGraspDataset(2, CFG, seed=3, cache_dir=tmp_path)
    monkeypatch.setattr(second, "_generate", lambda i: pytest.fail("a cached sample was generated again"))
    hit = second[1]
    assert set(hit) == KEYS and hit["mesh"] == s["mesh"] and hit["part_id"] == 1
    for k in KEYS - {"mesh", "part_id"}:
        np.testing.assert_array_equal(hit[k], s[k])
        assert hit[k].dtype == s[k].dtype
    # another seed or config is another cache folder
    PartGraspDataset(2, CFG, seed=4, cache_dir=tmp_path)[1]
    assert len(list(tmp_path.rglob("*.npz"))) == 2


def test_box_labels_sit_on_the_part_and_face_the_camera():
    ds = PartGraspDataset(2, GraspViewConfig(num_points=256, num_samples=200, num_approaches=4), seed=0, kinds=("box",))
    for i in range(2):
        s = ds[i]
        mesh = load_mesh(s["mesh"])
        g = _to_sensor(s)
        assert len(g) > 0
        contacts = np.concatenate([g[:, 0:3] + g[:, 9:10] / 2 * g[:, 6:9], g[:, 0:3] - g[:, 9:10] / 2 * g[:, 6:9]])
        d = _surface_distance(mesh, contacts)  # the pads' centre-line points, in the camera frame
        # on the box; a pad tilted inside the friction cone touches with a corner, its centre line stands off a little
        assert np.median(d) < 1e-3 and d.max() < 0.01
        ok, width, *_ = evaluate_grasps(mesh, g)
        assert ok.all()
        np.testing.assert_allclose(width, g[:, 9], atol=1e-4)
        ray = g[:, 0:3] / np.linalg.norm(g[:, 0:3], axis=1, keepdims=True)
        assert ((g[:, 3:6] * ray).sum(1) >= 0).all()  # palm on the camera side
        pts = s["points"][s["point_mask"]] * s["scale"] + s["center"]
        assert np.median(_surface_distance(mesh, pts)) < 0.002  # the cloud maps back onto the part


def test_collate_pads_grasps_with_a_mask():
    ds = PartGraspDataset(3, CFG, seed=1)
    samples = [ds[i] for i in range(3)]
    samples[1]["grasps"] = samples[1]["grasps"][:0]  # a sample without labels
    b = collate(samples)
    m = max(len(s["grasps"]) for s in samples)
    assert b["points"].shape == (3, 128, 3) and b["features"].shape == (3, 128, 3) and b["point_mask"].dtype == torch.bool
    assert b["grasps"].shape == (3, m, 11) and b["grasp_mask"].shape == (3, m)
    assert b["grasp_mask"].sum(1).tolist() == [len(s["grasps"]) for s in samples]
    assert (b["grasps"][~b["grasp_mask"]] == 0).all()
    assert b["center"].shape == (3, 3) and b["scale"].shape == (3,) and b["part_id"].tolist() == [0, 1, 2]
    assert isinstance(b["mesh"], list) and len(b["mesh"]) == 3


def test_decoded_ground_truth_goes_back_onto_the_mesh():
    """Sensor-frame round trip: proposals placed on the normalised labels, decoded with the sample's
    center/scale, pass the analytic check on the mesh in metres."""
    from lineside.fusion.grasp_decoder import GraspDecoder
    from lineside.fusion.grasp_head import GraspOutput

    ds = PartGraspDataset(2, CFG, seed=5)
    batch = collate([ds[0], ds[1]])
    g, gm = batch["grasps"], batch["grasp_mask"]
    assert gm.any(1).all()
    logits = torch.where(gm, 5.0 - torch.arange(g.shape[1]).float() * 0.01, torch.full_like(gm, -1.0, dtype=torch.float))
    out = GraspOutput(logits, g[..., 0:3], g[..., 3:6], g[..., 6:9], g[..., 9], g[..., 0:3], ~gm)
    pos, app, clo, width, score = GraspDecoder(top_k=3, nms_radius=0.005).decode(out, batch["center"], batch["scale"])
    np.testing.assert_allclose(pos[:, 0].numpy(), np.stack([_to_sensor(ds[i])[0, 0:3] for i in range(2)]), atol=1e-5)
    np.testing.assert_allclose(width[:, 0].numpy(), [_to_sensor(ds[i])[0, 9] for i in range(2)], atol=1e-6)
    res = evaluate_topk(pos.numpy(), app.numpy(), clo.numpy(), batch["mesh"], score.numpy())
    assert res["top1"] == 1.0 and res["top5"] == 1.0
    wrong = evaluate_topk(pos.numpy() + 0.5, app.numpy(), clo.numpy(), batch["mesh"], score.numpy())  # half a metre off: nothing
    assert wrong["top1"] == 0.0


def test_analytic_baseline_returns_valid_grasps():
    ds = PartGraspDataset(1, GraspViewConfig(num_points=512), seed=2, kinds=("box",))
    s = ds[0]
    m = s["point_mask"]
    pts = s["points"][m] * s["scale"] + s["center"]
    g = analytic_grasp_baseline(pts, s["features"][m], k=5)
    assert g.shape[1] == 11 and 0 < len(g) <= 5
    np.testing.assert_allclose(np.linalg.norm(g[:, 3:6], axis=1), 1.0, atol=1e-5)
    assert np.abs((g[:, 3:6] * g[:, 6:9]).sum(1)).max() < 1e-5
    assert (np.diff(g[:, 10]) <= 1e-7).all()  # best first


def test_workshop_tool_views(shared_data):
    ds = WorkshopToolsDataset(shared_data / "workshop_tools", tools=["Allen Key"], views_per_tool=1,
                              config=GraspViewConfig(num_points=256, distance=(0.5, 0.7), num_samples=150, num_approaches=4))
    s = ds[0]
    assert set(s) == KEYS and ds.tool_name(0) == "Allen Key" and len(s["grasps"]) > 0
    mesh = load_mesh(s["mesh"])
    hull = np.asarray(mesh.compute_convex_hull()[0].vertices)
    diameter = np.linalg.norm(hull[:, None] - hull[None], axis=-1).max()
    assert 0.182 < diameter < 0.192  # mm → m: 49 x 183 x 11 mm, posed
    pts = s["points"][s["point_mask"]] * s["scale"] + s["center"]
    assert np.median(_surface_distance(mesh, pts)) < 0.002
    ok, *_ = evaluate_grasps(mesh, _to_sensor(s)[:20])
    assert ok.all()
