"""RGB-D grasp views: the intensity image of a depth view (same camera, same pixels), its place in the
view cache key, batches carrying ``image`` next to the points, and a tiny image + point fit of
configs/tiny_grasp.yaml through the Lightning CLI (both modalities enter the fusion transformer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lineside.fusion.grasp_datamodule import GraspDataModule
from lineside.pointcloud.grasp_dataset import GraspViewConfig, PartGraspDataset
from lineside.pointcloud.io import CameraIntrinsics
from lineside.pointcloud.parts import look_at, make_part, render_intensity

REPO = Path(__file__).resolve().parents[1]
CAM = CameraIntrinsics(300.0, 300.0, 159.5, 119.5, 320, 240)


def _pixels(points_sensor: np.ndarray, size: int) -> np.ndarray:
    """Camera-frame points → (row, col) in the central-square image of side ``size``."""
    u = CAM.fx * points_sensor[:, 0] / points_sensor[:, 2] + CAM.cx
    v = CAM.fy * points_sensor[:, 1] / points_sensor[:, 2] + CAM.cy
    s = min(CAM.width, CAM.height)
    col = (u + 0.5 - (CAM.width - s) / 2) * size / s
    row = (v + 0.5 - (CAM.height - s) / 2) * size / s
    return np.stack([row, col], 1).astype(int)


def test_intensity_of_a_box_facing_the_camera() -> None:
    box = make_part("box", sx=0.1, sy=0.1, sz=0.02)  # 10 cm square, 0.4 m in front of the camera
    cam = look_at((0.0, 0.0, 0.4))
    img = render_intensity(box, cam, CAM, albedo=0.8, noise_std=0.0)
    assert img.shape == (240, 320) and img.dtype == np.uint8
    assert img[120, 160] == round(255 * 0.8)  # frontal face: full Lambertian term
    assert img[5, 5] == 40  # background
    small = render_intensity(box, cam, CAM, size=48, albedo=0.8, noise_std=0.0)
    assert small.shape == (48, 48) and small[24, 24] == round(255 * 0.8) and small[0, 0] == 40
    # the face spans 0.1 m / 0.39 m · 300 px ≈ 77 camera px ≈ 15 of 48 image px
    assert 12 <= (small[24] > 100).sum() <= 18


def test_dataset_image_matches_the_depth_view(tmp_path) -> None:
    cfg = GraspViewConfig(num_points=128, num_samples=60)
    plain = PartGraspDataset(3, cfg, seed=5, cache_dir=tmp_path)
    rgbd = PartGraspDataset(3, cfg, seed=5, cache_dir=tmp_path, image_size=64)
    assert plain.cache_dir != rgbd.cache_dir  # image-less caches are never read for image views
    for i in range(3):
        s, p = rgbd[i], plain[i]
        np.testing.assert_array_equal(s["points"], p["points"])  # the same view: image has its own generator
        np.testing.assert_array_equal(s["grasps"], p["grasps"])
        assert "image" not in p
        img = s["image"]
        assert img.shape == (1, 64, 64) and img.dtype == np.uint8
        sensor = s["points"][s["point_mask"]] * s["scale"] + s["center"]
        rc = np.clip(_pixels(sensor, 64), 0, 63)
        part = np.zeros((64, 64), bool)
        part[rc[:, 0], rc[:, 1]] = True
        # where the camera saw the part the image shows it (off the 40 grey-level background) ...
        assert (np.abs(img[0][part].astype(int) - 40) > 8).mean() > 0.8
        # ... and far from every observed point it shows the background
        near = torch.nn.functional.max_pool2d(torch.from_numpy(part)[None, None].float(), 7, 1, 3)[0, 0].numpy() > 0
        assert (np.abs(img[0][~near].astype(int) - 40) <= 10).mean() > 0.95
    again = PartGraspDataset(3, cfg, seed=5, cache_dir=tmp_path, image_size=64)[1]["image"]  # read from the cache
    np.testing.assert_array_equal(again, rgbd[1]["image"])


def test_datamodule_batches_carry_images(tmp_path) -> None:
    dm = GraspDataModule(num_train=2, num_val=2, num_points=64, num_samples=60, batch_size=2, cache_dir=str(tmp_path), intensity_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["points"].shape == (2, 64, 3)


def test_tiny_image_and_point_fit_and_tools_bench(tmp_path, shared_data, capsys) -> None:
    from lineside.fusion.training_cli import main

    run = tmp_path / "run"
    enc = ('{"class_path": "lineside.vision.ImageEncoder", "init_args": {"backbone": "test_efficientnet", "embed_dim": 32, '
           '"in_chans": 1, "feature_levels": [-1], "pretrained": false}}')
    cli = main(["fit", "--config", str(REPO / "configs" / "tiny_grasp.yaml"), "--trainer.default_root_dir", str(run),
                "--trainer.max_steps", "2", "--data.cache_dir", str(tmp_path / "cache"), "--data.intensity_size", "32",
                "--model.model.init_args.image_encoder", enc,
                "--model.model.init_args.fusion.init_args.modalities", '{"points": 3, "image": 2}'])
    model = cli.model.model
    assert model.image_encoder is not None and cli.datamodule.image_size == 32
    batch = next(iter(cli.datamodule.val_dataloader()))
    encoded = model.encode(**cli.model.model.batch_inputs(batch))
    assert set(encoded) == {"image", "points"}  # both modalities enter the fusion transformer
    out = model(**cli.model.model.batch_inputs(batch))
    assert out.grasp is not None
    assert (run / "checkpoints" / "best.ckpt").is_file()
    # the tools bench rebuilds the image views from the checkpoint's data settings and feeds both modalities
    import importlib.util

    spec = importlib.util.spec_from_file_location("grasp_tools_bench", REPO / "bench" / "grasp_tools.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dm = bench.data_module(dict(cli.datamodule.hparams), type("A", (), {"views_per_tool": 1, "tools_root": str(shared_data / "workshop_tools"),
                                                                         "cache_dir": None, "workers": 0})())
    assert dm.image_size == 32 and "image" in dm.dataset("test")[0]
    result = bench.main([str(run / "checkpoints" / "best.ckpt"), "--views-per-tool", "1", "--workers", "0",
                         "--tools-root", str(shared_data / "workshop_tools"), "--cache-dir", str(tmp_path / "cache")])
    assert result["rows"][-1]["tool"] == "ALL" and result["rows"][-1]["views"] == 2
