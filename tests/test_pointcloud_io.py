"""Point-cloud IO and preprocessing: round trips per format, depth back-projection, NaN and unit checks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import open3d as o3d
import pytest

from lineside.pointcloud.io import (
    CameraIntrinsics,
    PointCloud,
    PointCloudReadError,
    depth_to_point_cloud,
    read_depth_image,
    read_intrinsics,
    read_point_cloud,
    read_rgbd,
)
from lineside.pointcloud.preprocess import (
    CloudUnitsWarning,
    check_metres,
    crop_to_box,
    estimate_normals,
    normalize,
    preprocess_cloud,
    remove_statistical_outliers,
    sample_fixed,
    voxel_downsample,
)


@pytest.fixture
def cloud_arrays():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.05, 0.05, (200, 3))
    normals = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    colors = rng.uniform(0, 1, (200, 3))
    return pts, normals, colors


def _o3d_cloud(pts, normals=None, colors=None):
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    if normals is not None:
        pcd.normals = o3d.utility.Vector3dVector(normals)
    if colors is not None:
        pcd.colors = o3d.utility.Vector3dVector(colors)
    return pcd


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
def test_open3d_formats_round_trip(tmp_path, cloud_arrays, suffix):
    pts, normals, colors = cloud_arrays
    path = tmp_path / f"part{suffix}"
    assert o3d.io.write_point_cloud(str(path), _o3d_cloud(pts, normals, colors))
    cloud = read_point_cloud(path)
    np.testing.assert_allclose(cloud.points, pts, atol=1e-6)
    np.testing.assert_allclose(cloud.normals, normals, atol=1e-6)
    np.testing.assert_allclose(cloud.colors, colors, atol=1 / 255 + 1e-6)
    assert cloud.source == str(path) and cloud.dropped_nonfinite == 0


def test_xyz_and_npy_round_trip(tmp_path, cloud_arrays):
    pts, normals, colors = cloud_arrays
    np.savetxt(tmp_path / "a.xyz", pts)
    np.testing.assert_allclose(read_point_cloud(tmp_path / "a.xyz").points, pts, atol=1e-12)
    np.savetxt(tmp_path / "b.xyz", np.c_[pts, normals])
    np.testing.assert_allclose(read_point_cloud(tmp_path / "b.xyz").normals, normals, atol=1e-12)
    np.save(tmp_path / "c.npy", pts.astype(np.float32))
    c = read_point_cloud(tmp_path / "c.npy")
    assert c.points.shape == (200, 3) and c.normals is None and c.colors is None
    np.save(tmp_path / "d.npy", np.c_[pts, colors * 255])  # 0-255 colours become 0-1
    d = read_point_cloud(tmp_path / "d.npy")
    np.testing.assert_allclose(d.colors, colors, atol=1e-9)
    assert d.normals is None
    np.save(tmp_path / "e.npy", np.c_[pts, normals])
    np.testing.assert_allclose(read_point_cloud(tmp_path / "e.npy").normals, normals)
    np.testing.assert_allclose(read_point_cloud(tmp_path / "c.npy", scale=1000).points, pts.astype(np.float32) * 1000, rtol=1e-6)


def test_nan_points_dropped_with_count(tmp_path, cloud_arrays):
    pts = cloud_arrays[0].copy()
    pts[[3, 7, 11]] = np.nan
    pts[20, 1] = np.inf
    np.save(tmp_path / "nan.npy", pts)
    with pytest.warns(UserWarning, match=r"nan\.npy: dropped 4 of 200"):
        cloud = read_point_cloud(tmp_path / "nan.npy")
    assert len(cloud) == 196 and cloud.dropped_nonfinite == 4 and np.isfinite(cloud.points).all()
    assert o3d.io.write_point_cloud(str(tmp_path / "nan.ply"), _o3d_cloud(pts))
    with pytest.warns(UserWarning, match="dropped 4"):
        assert len(read_point_cloud(tmp_path / "nan.ply")) == 196
    np.save(tmp_path / "allnan.npy", np.full((5, 3), np.nan))
    with pytest.raises(PointCloudReadError, match=r"allnan\.npy: all 5 points are NaN"):
        read_point_cloud(tmp_path / "allnan.npy")


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(PointCloudReadError, match=r"missing\.ply: file not found"):
        read_point_cloud(tmp_path / "missing.ply")
    (tmp_path / "empty.pcd").write_bytes(b"")
    with pytest.raises(PointCloudReadError, match=r"empty\.pcd: file is empty"):
        read_point_cloud(tmp_path / "empty.pcd")
    (tmp_path / "corrupt.ply").write_text("this is not a ply file\n")
    with pytest.raises(PointCloudReadError, match=r"corrupt\.ply: no points could be read"):
        read_point_cloud(tmp_path / "corrupt.ply")
    good = tmp_path / "good.ply"
    assert o3d.io.write_point_cloud(str(good), _o3d_cloud(np.random.default_rng(0).normal(size=(50, 3))), write_ascii=True)
    (tmp_path / "cut.ply").write_bytes(good.read_bytes()[:-300])  # open3d alone fills the missing vertices with garbage
    with pytest.raises(PointCloudReadError, match=r"cut\.ply: truncated or corrupt \.ply file \(\d+ data lines for 50 vertices\)"):
        read_point_cloud(tmp_path / "cut.ply")
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(PointCloudReadError, match=r"corrupt\.npy"):
        read_point_cloud(tmp_path / "corrupt.npy")
    np.save(tmp_path / "zero.npy", np.zeros((0, 3)))
    with pytest.raises(PointCloudReadError, match=r"zero\.npy: the point cloud is empty"):
        read_point_cloud(tmp_path / "zero.npy")
    np.save(tmp_path / "wide.npy", np.zeros((4, 4)))
    with pytest.raises(PointCloudReadError, match=r"wide\.npy: expected an \(N, 3\)"):
        read_point_cloud(tmp_path / "wide.npy")
    (tmp_path / "cloud.obj").write_text("v 0 0 0\n")
    with pytest.raises(PointCloudReadError, match="unsupported"):
        read_point_cloud(tmp_path / "cloud.obj")
    assert issubclass(PointCloudReadError, ValueError)


def test_depth_to_cloud_hand_made_case():
    # 2x2 depth, fx=2, fy=4, cx=cy=0.5: (u, v, z) → ((u - 0.5) z / 2, (v - 0.5) z / 4, z); (0, 1) is a hole
    k = CameraIntrinsics(fx=2.0, fy=4.0, cx=0.5, cy=0.5, width=2, height=2)
    depth = np.array([[1.0, 2.0], [0.0, 4.0]], np.float32)
    cloud = depth_to_point_cloud(depth, k)
    expected = np.array([[-0.25, -0.125, 1.0], [0.5, -0.25, 2.0], [1.0, 0.5, 4.0]])
    np.testing.assert_allclose(cloud.points, expected, atol=1e-7)
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 0], [0, 0, 255]]], np.uint8)
    coloured = depth_to_point_cloud(depth, k, rgb)
    np.testing.assert_allclose(coloured.points, expected, atol=1e-7)
    np.testing.assert_allclose(coloured.colors, np.eye(3), atol=1e-6)
    depth_nan = depth.copy()
    depth_nan[0, 0] = np.nan
    assert len(depth_to_point_cloud(depth_nan, k)) == 2
    with pytest.raises(PointCloudReadError, match="no valid pixel"):
        depth_to_point_cloud(np.zeros((2, 2), np.float32), k)
    with pytest.raises(PointCloudReadError, match="intrinsics say 2x2"):
        depth_to_point_cloud(np.ones((3, 2), np.float32), k)


def test_depth_files_png_mm_npy_and_tiff_m_with_intrinsics_json(tmp_path):
    depth_m = np.array([[1.0, 2.0], [0.0, 4.0]], np.float32)
    (tmp_path / "k.json").write_text(json.dumps({"width": 2, "height": 2, "fx": 2.0, "fy": 4.0, "cx": 0.5, "cy": 0.5}))
    o3d_k = o3d.camera.PinholeCameraIntrinsic(2, 2, 2.0, 4.0, 0.5, 0.5)
    assert o3d.io.write_pinhole_camera_intrinsic(str(tmp_path / "o3d.json"), o3d_k)
    k = read_intrinsics(tmp_path / "k.json")
    assert read_intrinsics(tmp_path / "o3d.json") == k
    assert cv2.imwrite(str(tmp_path / "d.png"), (depth_m * 1000).astype(np.uint16))
    np.save(tmp_path / "d.npy", depth_m)
    assert cv2.imwrite(str(tmp_path / "d.tiff"), depth_m)
    expected = depth_to_point_cloud(depth_m, k).points
    for name in ("d.png", "d.npy", "d.tiff"):
        np.testing.assert_allclose(read_depth_image(tmp_path / name), depth_m, atol=1e-6)
        np.testing.assert_allclose(read_rgbd(tmp_path / name, tmp_path / "k.json").points, expected, atol=1e-6)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.full((2, 2, 3), 255, np.uint8))
    assert read_rgbd(tmp_path / "d.png", k, tmp_path / "rgb.png").colors.shape == (3, 3)
    with pytest.raises(PointCloudReadError, match=r"nope\.png: depth image not found"):
        read_depth_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PointCloudReadError, match=r"bad\.png: not a readable depth image"):
        read_depth_image(tmp_path / "bad.png")
    (tmp_path / "bad.json").write_text("{\"fx\": 1}")
    with pytest.raises(PointCloudReadError, match=r"bad\.json: not a valid intrinsics"):
        read_intrinsics(tmp_path / "bad.json")


def test_preprocess_steps_and_transform_back_to_sensor():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-0.03, 0.03, (3000, 3)) + np.array([0.1, -0.2, 0.6])
    pts[:5] += 0.5  # far outliers
    cloud = PointCloud(pts, source="scan.ply")
    cropped = crop_to_box(cloud, [0.0, -0.3, 0.5], [0.2, -0.1, 0.7])
    assert len(cropped) == 2995
    with pytest.raises(ValueError, match=r"scan\.ply: no point left after cropping"):
        crop_to_box(cloud, [5, 5, 5], [6, 6, 6])
    cleaned = remove_statistical_outliers(PointCloud(pts, source="scan.ply"), 20, 2.0)
    assert len(cleaned) <= 2995 and (cleaned.points[:, 2] < 0.7).all()  # the five shifted by +0.5 are gone
    down = voxel_downsample(cropped, 0.01)
    assert 100 < len(down) < len(cropped)
    with_normals = estimate_normals(down, radius=0.02)
    np.testing.assert_allclose(np.linalg.norm(with_normals.normals, axis=1), 1.0, atol=1e-6)
    normed, t = normalize(cropped)
    assert np.linalg.norm(normed.points, axis=1).max() == pytest.approx(1.0)
    np.testing.assert_allclose(t.to_sensor(normed.points), cropped.points, atol=1e-12)
    assert t.length_to_sensor(0.5) == pytest.approx(0.5 * t.scale)


def test_sample_fixed_pads_with_mask_and_batches():
    pts = np.arange(30, dtype=np.float64).reshape(10, 3)
    out, feats, mask, index = sample_fixed(pts, 16, features=pts * 2)
    assert out.shape == (16, 3) and mask.sum() == 10 and (out[~mask] == 0).all() and (index[~mask] == -1).all()
    np.testing.assert_array_equal(out[mask], pts)
    np.testing.assert_array_equal(feats[mask], pts * 2)
    out, _, mask, index = sample_fixed(np.random.default_rng(0).normal(size=(100, 3)), 16)
    assert mask.all() and len(set(index.tolist())) == 16


def test_millimetre_cloud_is_flagged_and_pipeline_output():
    rng = np.random.default_rng(2)
    mm = PointCloud(rng.uniform(0, 120, (500, 3)), source="part_mm.ply")
    with pytest.warns(CloudUnitsWarning, match="scale=0.001"):
        check_metres(mm)
    with pytest.raises(ValueError, match=r"part_mm\.ply: .*scale=0\.001"):
        preprocess_cloud(mm, 64)
    metres = PointCloud(mm.points * 0.001, source="part_m.ply")
    out = preprocess_cloud(metres, 256, voxel_size=0.004)
    assert out.points.shape == (256, 3) and out.normals.shape == (256, 3) and out.mask.shape == (256,)
    assert np.isfinite(out.points).all() and np.abs(out.points[out.mask]).max() <= 1.0 + 1e-6
    sensor = out.transform.to_sensor(out.points[out.mask])
    assert sensor.min() >= -1e-9 and sensor.max() <= 0.12 + 1e-9
    with pytest.raises(ValueError, match="fewer than 32"):
        preprocess_cloud(PointCloud(rng.uniform(0, 0.01, (10, 3)), source="tiny.ply"), 64)
