"""Localization end to end: the detection data module, a fit of configs/tiny_det.yaml through the
Lightning CLI (box mAP logged), the checkpoint reloaded, and its ONNX export with box parity."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.training_cli import InspectionCLI, RunConfigCallback

REPO = Path(__file__).resolve().parents[1]
TINY_DET = REPO / "configs" / "tiny_det.yaml"

pytestmark = pytest.mark.needs_shared


def _fit(args: list[str]):
    """``lineside fit`` of a config whose data section is a DetectionDataModule (``class_path``)."""
    from lineside.fusion.training_cli import AnyDataInspectionCLI, main

    cli = main(args)
    assert isinstance(cli, AnyDataInspectionCLI)
    return cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "neu_det").is_dir():
        pytest.skip(f"{SHARED_DATA / 'neu_det'} is absent (real data sits beside the repo as ../shared)")
    run = tmp_path_factory.mktemp("tiny_det")
    _fit(["fit", "--config", str(TINY_DET), "--trainer.default_root_dir", str(run)])
    return run


def test_detection_datamodule_batches(shared_data) -> None:
    from lineside.fusion.detection_datamodule import DetectionDataModule

    dm = DetectionDataModule("neu_det", root=str(shared_data / "neu_det"), image_size=96, batch_size=4, num_workers=0, limit=8)
    dm.setup("fit")
    assert dm.num_classes == 6 and dm.class_names[0] == "crazing" and dm.channels == 1
    assert {len(v) for v in dm.splits.values()} == {8}
    paths = [set(r.path for r in dm.splits[s]) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 96, 96) and batch["image"].dtype == torch.uint8
    assert batch["has_boxes"].all() and (batch["grade"] == -1).all()
    assert batch["box_mask"].any(1).all()  # every NEU-DET image has a box
    real = batch["boxes"][batch["box_mask"]]
    assert (real[:, 2] > real[:, 0]).all() and real.max() <= 96


def test_detection_datamodule_missing_root(tmp_path) -> None:
    from lineside.fusion.detection_datamodule import DetectionDataModule

    with pytest.raises(FileNotFoundError, match="--data.root"):
        DetectionDataModule("deeppcb", root=str(tmp_path / "nope")).setup("fit")
    with pytest.raises(ValueError, match="neu_det"):
        DetectionDataModule("voc")


def test_fit_tiny_det_logs_box_map(tiny_run: Path) -> None:
    rows = list(csv.DictReader(open(tiny_run / "logs" / "version_0" / "metrics.csv")))
    train = [float(r["train/loss_localization"]) for r in rows if r.get("train/loss_localization")]
    assert len(train) == 4 and all(math.isfinite(v) for v in train)
    val = [r for r in rows if r.get("val/map_50")]
    assert val and 0.0 <= float(val[-1]["val/map_50"]) <= 1.0
    assert "val/ap_50/crazing" in rows[0] and "train/loss_grade" not in rows[0]
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["lineside"]
    assert meta["tasks"] == ["localization"] and meta["class_names"] == []
    assert meta["box_class_names"][:2] == ["crazing", "inclusion"] and meta["image_size"] == 96


def test_checkpoint_loads_and_deploys(tiny_run: Path) -> None:
    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.deployable import build_deployable

    loaded = load_inspection_model(tiny_run / "checkpoints" / "last.ckpt")
    assert loaded.tasks == ["localization"] and len(loaded.box_class_names) == 6
    d = build_deployable(loaded, input_size=(200, 200))
    assert d.output_names == ["boxes", "box_scores", "box_labels", "defect_heatmap"]
    out = d.run(torch.randint(0, 256, (2, 1, 200, 200), dtype=torch.uint8))
    k = d.box_decoder.top_k
    assert out["boxes"].shape == (2, k, 4) and out["box_labels"].dtype == torch.int64
    assert out["boxes"].max() <= 200 and out["defect_heatmap"].shape == (2, 1, 6, 6)
    assert torch.all(out["box_scores"][:, :-1] >= out["box_scores"][:, 1:])


def test_export_onnx_box_parity(tiny_run: Path, tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.verify import verify_artefact

    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((shared_data / "neu_det" / "IMAGES").glob("*.jpg"))[::300][:4]:
        shutil.copy(p, calib / p.name)
    result = export_onnx(tiny_run / "checkpoints" / "last.ckpt", tmp_path / "onnx", parity_images=4, calib=calib, verify=verify_artefact)
    names = [o["name"] for o in result.metadata["outputs"]]
    assert names == ["boxes", "box_scores", "box_labels", "defect_heatmap"]
    assert result.parity is not None and result.parity.ok, result.parity.table()
    assert {r["output"] for r in result.metadata["parity"]["rows"]} >= set(names)
