"""Grasp training end to end: GraspDataModule (procedural train/val, leave-tools-out test splits), a fit of
configs/tiny_grasp.yaml through the Lightning CLI, what its checkpoint records for the point side, the
test stage on real tools, the grasp metrics, and clear errors for mismatched data and models."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import torch

from lineside.fusion.grasp_datamodule import GraspDataModule, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
TINY_GRASP = REPO / "configs" / "tiny_grasp.yaml"


def _main(args: list[str]):
    from lineside.fusion.training_cli import AnyDataInspectionCLI, main

    cli = main(args)
    assert isinstance(cli, AnyDataInspectionCLI)  # the data section names GraspDataModule by class_path
    return cli


def _metrics(run: Path) -> list[dict]:
    files = sorted(run.glob("logs/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run}"
    with open(files[-1], newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny_grasp")
    _main(["fit", "--config", str(TINY_GRASP), "--trainer.default_root_dir", str(run)])
    return run


def test_datamodule_batches_procedural_views(tmp_path) -> None:
    dm = GraspDataModule(num_train=4, num_val=2, num_points=64, num_samples=60, batch_size=2, cache_dir=str(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["points"].shape == (2, 64, 3) and batch["point_mask"].dtype == torch.bool
    assert batch["point_features"].shape == (2, 64, 3) and (batch["grade"] == -1).all()
    assert batch["grasps"].shape[-1] == 11 and batch["grasp_mask"].any()
    real = batch["points"][batch["point_mask"]]
    assert real.norm(dim=-1).max() <= 1.0 + 1e-5  # normalised into the unit ball
    # train and val are different views (other seed)
    val = dm.dataset("val")[0]
    assert not np.allclose(val["points"], dm.dataset("train")[0]["points"])
    # a second module on the same cache reads the views, identical
    again = GraspDataModule(num_train=4, num_val=2, num_points=64, num_samples=60, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.dataset("train")[1]["grasps"], dm.dataset("train")[1]["grasps"])
    cfg = dm.point_config
    assert cfg["num_points"] == 64 and cfg["features"] == "normals" and cfg["center"] == "centroid"
    assert cfg["scale"] == "max_radius" and cfg["gripper"]["max_width"] == 0.08
    no_normals = GraspDataModule(num_train=4, num_val=2, num_points=64, num_samples=60, batch_size=2, features=None, cache_dir=str(tmp_path))
    b = next(iter(no_normals.val_dataloader()))
    assert "point_features" not in b and "features" not in b


def test_cache_dir_follows_lineside_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LINESIDE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "grasp"
    assert GraspDataModule().cache_dir == tmp_path / "grasp"
    monkeypatch.delenv("LINESIDE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lineside" / "grasp"


def test_leave_tools_out_splits(shared_data) -> None:
    root = str(shared_data / "workshop_tools")
    tools = GraspDataModule(tools_root=root).all_tools()
    assert len(tools) == 15
    folds = [GraspDataModule(tools_root=root, fold=f, num_folds=5).tool_split() for f in range(5)]
    held = [t for test, _ in folds for t in test]
    assert sorted(held) == tools  # every tool held out exactly once
    test, train = GraspDataModule(tools_root=root, fold=1, num_folds=5, train_tools="rest").tool_split()
    assert len(test) == 3 and not set(test) & set(train) and len(test) + len(train) == 15
    with pytest.raises(ValueError, match="held out for test"):
        GraspDataModule(tools_root=root, test_tools=["Hammer"], train_tools=["Hammer", "File"]).tool_split()
    with pytest.raises(ValueError, match="not in"):
        GraspDataModule(tools_root=root, test_tools=["Spanner"]).tool_split()
    with pytest.raises(FileNotFoundError, match="--data.tools_root"):
        GraspDataModule(tools_root=str(shared_data / "nowhere")).tool_split()


def test_tiny_fit_logs_grasp_metrics_and_records_the_point_side(tiny_run: Path) -> None:
    rows = _metrics(tiny_run)
    assert any(r.get("train/loss_graspability") for r in rows)
    val = [r for r in rows if r.get("val/grasp_top1")]
    assert val and all(0.0 <= float(r["val/grasp_top1"]) <= float(r["val/grasp_top5"]) <= 1.0 for r in val)
    assert all(0.0 <= float(r["val/grasp_coverage"]) <= 1.0 for r in val)
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["lineside"]
    assert "grasp" in meta["tasks"]
    pts = meta["points"]
    assert pts["num_points"] == 128 and pts["features"] == "normals"
    assert pts["voxel_size"] == 0.002 and pts["normal_radius"] == 0.01
    assert pts["center"] == "centroid" and pts["scale"] == "max_radius"
    # the export side rebuilds the model from it
    from lineside.export.checkpoint import load_inspection_model

    loaded = load_inspection_model(tiny_run / "checkpoints" / "best.ckpt")
    assert loaded.points["num_points"] == 128 and loaded.model.grasp_head is not None


def test_tiny_test_stage_on_real_tools(tiny_run: Path, shared_data) -> None:
    _main(["test", "--config", str(TINY_GRASP), "--ckpt_path", str(tiny_run / "checkpoints" / "best.ckpt"),
           "--data.tools_root", str(shared_data / "workshop_tools")])
    rows = [r for r in _metrics(tiny_run) if r.get("test/grasp_top1")]
    assert rows and 0.0 <= float(rows[-1]["test/grasp_top1"]) <= 1.0


def test_predict_returns_decoded_grasps(tiny_run: Path) -> None:
    from lineside.fusion.grasp_datamodule import grasp_collate
    from lineside.fusion.lightning_module import InspectionModule

    module = InspectionModule.load_from_checkpoint(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu")
    module.eval()
    dm = GraspDataModule(num_train=2, num_val=2, num_points=128, num_samples=100)
    batch = grasp_collate([dm.dataset("val")[i] for i in range(2)])
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert out["grasp_position"].shape == (2, 5, 3) and out["grasp_score"].shape == (2, 5)
    # sensor metres: the grasps lie near the cloud, 0.3-0.5 m from the camera
    dist = out["grasp_position"].norm(dim=-1)
    assert ((dist > 0.15) & (dist < 0.8)).all()
    np.testing.assert_allclose(out["grasp_approach"].norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_grasp_data_with_an_image_only_model_errors_clearly(tmp_path) -> None:
    import lightning as L

    from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
    from lineside.fusion.lightning_module import InspectionModule
    from lineside.vision import ImageEncoder

    model = InspectionModel(ImageEncoder(backbone="test_efficientnet", embed_dim=32, in_chans=1, pretrained=False),
                            FusionTransformer(32, depth=1, num_heads=2), GradingHead(32, 4))
    module = InspectionModule(model)
    dm = GraspDataModule(num_train=2, num_val=2, num_points=64, num_samples=60, cache_dir=str(tmp_path))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(ValueError, match="no grasp head"):
        trainer.fit(module, dm)
    # and a point batch handed to the image-only model names what is missing
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="no point encoder"):
        module.training_step(batch, 0)


def test_grasp_metrics_success_and_coverage() -> None:
    """A 4 cm cube 0.4 m in front of the camera: a side grasp succeeds, a grasp in the air fails;
    coverage counts the ground-truth clusters a successful grasp reaches. The grasp task's metric
    is registered with the LightningModule (moved, reset and synced by Lightning)."""
    from lineside.fusion import FusionTransformer, InspectionModel
    from lineside.fusion.grasp_head import GraspHead
    from lineside.fusion.grasp_metrics import GraspSuccess
    from lineside.fusion.lightning_module import InspectionModule
    from lineside.pointcloud.grasp_dataset import _mesh_ref
    from lineside.pointcloud.point_encoder import PointEncoder

    model = InspectionModel(point_encoder=PointEncoder(32, (16, 4), (8, 4), ((16, 32), (32, 32)), (0.1, 0.3)),
                            fusion=FusionTransformer(32, depth=1, num_heads=2, modalities={"points": 3}), grasp_head=GraspHead(32))
    module = InspectionModule(model, coverage_radius=0.02)
    metric = module.metrics["val"]["grasp"]
    assert isinstance(metric, GraspSuccess) and metric.coverage_radius == 0.02
    assert any(m is metric for m in module.modules())
    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 0.4]  # make_part centres the box: its centre 0.4 m in front of the camera
    ref = _mesh_ref(kind="box", dims={"sx": 0.04, "sy": 0.04, "sz": 0.04}, pose=pose)
    good = ([0.0, 0.0, 0.4], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    air = ([0.2, 0.0, 0.4], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    gt = torch.tensor([[0.0, 0.0, 0.4], [0.0, 0.001, 0.4], [0.0, 0.0, 0.43]])  # two clusters at 2 cm
    views = [tuple(torch.tensor(v) for v in zip(good, air)), tuple(torch.tensor(v) for v in zip(air, good))]
    pos, app, clo = (torch.stack([v[j] for v in views]) for j in range(3))
    metric.update(pos, app, clo, torch.tensor([[0.9, 0.8]] * 2), [ref, ref], gt.expand(2, -1, -1), torch.ones(2, 3, dtype=torch.bool))
    m = {k: float(v) for k, v in metric.compute().items()}
    assert m["grasp_top1"] == 0.5 and m["grasp_top5"] == 1.0
    assert m["grasp_coverage"] == 0.5  # each view reaches the first cluster, not the one 3 cm away
    assert "grasp_top1_strict" not in m  # no widths given: no strict figures
    metric.reset()
    assert float(metric.samples) == 0
    # strict: executed as predicted; the 4 cm cube needs a 4 cm width, half of it fails
    args = (pos, app, clo, torch.tensor([[0.9, 0.8]] * 2), [ref, ref], gt.expand(2, -1, -1), torch.ones(2, 3, dtype=torch.bool))
    metric.update(*args, torch.full((2, 2), 0.04))
    m = {k: float(v) for k, v in metric.compute().items()}
    assert m["grasp_top1_strict"] == 0.5 and m["grasp_top5_strict"] == 1.0
    metric.reset()
    metric.update(*args, torch.full((2, 2), 0.02))
    m = {k: float(v) for k, v in metric.compute().items()}
    assert m["grasp_top1"] == 0.5 and m["grasp_top5_strict"] == 0.0


def test_box_reference_is_a_procedural_part() -> None:
    """The coverage test's mesh reference loads as a 4 cm cube (guards its assumptions)."""
    from lineside.pointcloud.grasp_dataset import load_mesh

    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 0.4]
    from lineside.pointcloud.grasp_dataset import _mesh_ref

    mesh = load_mesh(_mesh_ref(kind="box", dims={"sx": 0.04, "sy": 0.04, "sz": 0.04}, pose=pose))
    assert isinstance(mesh, o3d.geometry.TriangleMesh)
    np.testing.assert_allclose(mesh.get_axis_aligned_bounding_box().get_center(), [0, 0, 0.4], atol=1e-6)


def test_tools_bench_compares_the_three_methods_on_the_same_views(tiny_run: Path, shared_data, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("grasp_tools_bench", REPO / "bench" / "grasp_tools.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main([str(tiny_run / "checkpoints" / "best.ckpt"), "--views-per-tool", "1", "--workers", "0",
                         "--tools-root", str(shared_data / "workshop_tools")])
    assert result["test_tools"] == ["Allen Key", "Screwdriver"] and result["train_tools"] == []
    rows = {r["tool"]: r for r in result["rows"]}
    assert set(rows) == {"Allen Key", "Screwdriver", "ALL"} and rows["ALL"]["views"] == 2
    for r in rows.values():
        for m in ("network", "analytic", "slab"):
            assert 0.0 <= r[f"{m}_top1"] <= r[f"{m}_top5"] <= 1.0
    out = capsys.readouterr().out
    assert "all unseen" in out and "slab t1" in out
