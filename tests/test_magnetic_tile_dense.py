"""Magnetic tile masks for the dense decoder: folder class → mask value, the detection split kept,
configs/magnetic_tile_dense.yaml fitting on a few real tiles, and the side-by-side scoring of
bench/magnetic_tile_table.py (one metric for every method's maps)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, SHARED_DATA
from lineside.fusion.detection_datamodule import DetectionDataModule
from lineside.fusion.segmentation_datamodule import SegmentationDataModule
from lineside.vision.box_formats import MAGNETIC_TILE_CLASSES
from lineside.vision.box_records import DetectionFormatError, DetectionRecord
from lineside.vision.record_masks import RecordMaskDataset, record_class_index

MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


def _tile(root: Path, cls: str, n: int, size=(40, 30), mask_box=(5, 5, 15, 12), seed=0) -> list[Path]:
    """n tiles of class ``cls`` as MT_<cls>/Imgs/<stem>.jpg + .png (a rectangle defect unless Free)."""
    rng = np.random.default_rng(seed)
    folder = root / f"MT_{cls}" / "Imgs"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        stem = f"exp1_num_{seed * 1000 + i}"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(folder / f"{stem}.jpg")
        m = np.zeros((size[1], size[0]), dtype=np.uint8)
        if cls != "Free":
            x1, y1, x2, y2 = mask_box
            m[y1:y2, x1:x2] = 255
        Image.fromarray(m).save(folder / f"{stem}.png")
        out.append(folder / f"{stem}.jpg")
    return out


@pytest.fixture()
def tiles(tmp_path) -> Path:
    root = tmp_path / "magnetic_tile"
    _tile(root, "Free", 12, seed=1)
    _tile(root, "Blowhole", 10, seed=2)
    _tile(root, "Crack", 10, seed=3)
    return root


def test_mask_pixels_take_the_folder_class_and_free_tiles_are_background(tiles):
    dm = SegmentationDataModule(dataset="magnetic_tile", root=str(tiles), image_size=32, batch_size=64, num_workers=0)
    assert dm.class_names == list(MAGNETIC_TILE_CLASSES) and dm.num_classes == 5
    for split in ("train", "test"):
        batch = next(iter(dm._loader(split)))
        assert batch["image"].shape[1:] == (1, 32, 32) and batch["has_seg"].all()
        for path, mask in zip(batch["path"], batch["seg_mask"]):
            cls = Path(path).parts[-3][3:]
            values = set(mask.unique().tolist())
            if cls == "Free":
                assert values == {0}
            else:
                assert values == {0, MAGNETIC_TILE_CLASSES.index(cls) + 1}
                assert (mask > 0).float().mean() == pytest.approx(70 / 1200, abs=0.03)  # the 10x7 rectangle of 40x30
    binary = SegmentationDataModule(dataset="magnetic_tile", root=str(tiles), image_size=32, batch_size=64, num_workers=0, binary=True)
    assert binary.class_names == ["defect"]
    assert set(next(iter(binary._loader("train")))["seg_mask"].unique().tolist()) == {0, 1}


def test_split_is_the_detection_split(tiles):
    seg = SegmentationDataModule(dataset="magnetic_tile", root=str(tiles)).prepare_splits()
    det = DetectionDataModule(dataset="magnetic_tile", root=str(tiles)).prepare_splits()
    assert {k: [r.path for r in v] for k, v in seg.items()} == {k: [r.path for r in v] for k, v in det.items()}
    assert seg["test"] and seg["val"]


def test_unknown_dataset_and_mismatched_mask_are_refused(tmp_path):
    with pytest.raises(ValueError, match="magnetic_tile"):
        SegmentationDataModule(dataset="neu_det")
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "a" / "x.jpg")
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "a" / "x.png")
    rec = DetectionRecord(str(tmp_path / "a" / "x.jpg"), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 12, 10,
                          mask_path=str(tmp_path / "a" / "x.png"), image_class="Crack")
    assert record_class_index(rec, MAGNETIC_TILE_CLASSES) == 3 and record_class_index(rec, MAGNETIC_TILE_CLASSES, binary=True) == 1
    assert record_class_index(rec, ["Blowhole"]) == 0
    with pytest.raises(DetectionFormatError, match="x.png: mask is 12x9"):
        RecordMaskDataset([rec], MAGNETIC_TILE_CLASSES)[0]


def test_dense_config_fits_on_a_few_real_tiles(tmp_path):
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"{MAGNETIC_TILE} is absent (real data sits beside the repo as ../shared)")
    from lineside.fusion.tasks import SegmentationTask
    from lineside.fusion.training_cli import main

    cfg = yaml.safe_load((REPO / "configs" / "magnetic_tile_dense.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=2, max_epochs=1, limit_val_batches=1,
                          num_sanity_val_steps=0, log_every_n_steps=1, enable_model_summary=False, accelerator="cpu",
                          logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}})
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]  # the checkpoint on val pixel AUROC
    cfg["data"]["init_args"].update(root=str(MAGNETIC_TILE), image_size=64, batch_size=4, num_workers=0, limit=8)
    path = tmp_path / "magnetic_tile_dense.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    task = cli.model.model.tasks[0]
    assert isinstance(task, SegmentationTask) and task.head.class_names == ["defect"] == cli.datamodule.class_names
    assert task.head.defect_classes == [1]  # defect vs background: the heatmap is p(defect)
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    losses = [float(r["train/loss_seg_ce"]) for r in rows if r.get("train/loss_seg_ce")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any("val/pixel_auroc" in r for r in rows) and any(r.get("val/miou") for r in rows)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["lineside"]["tasks"] == ["segmentation"] and ckpt["lineside"]["image_size"] == 64


# --------------------------------------------------------------------------- bench scoring


def _bench():
    spec = importlib.util.spec_from_file_location("magnetic_tile_table", REPO / "bench" / "magnetic_tile_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _npz(path: Path, paths, maps, scores, probability: bool) -> Path:
    np.savez(path, paths=np.array(paths), maps=np.asarray(maps, np.float32), scores=np.asarray(scores, np.float64), fit_s=1.0,
             infer_s_per_image=0.01, train_data="t", method=path.stem, note="", probability=probability)
    return path


def test_bench_scores_every_method_with_the_same_metric(tiles, tmp_path):
    bench = _bench()
    splits = DetectionDataModule(dataset="magnetic_tile", root=str(tiles)).prepare_splits()
    test = splits["test"]
    masks = [(np.asarray(Image.open(r.mask_path)) > 127).astype(np.float32) for r in test]
    # maps at another size than the masks (as every method's are): 15x20 for 30x40 masks
    small = [m[::2, ::2] for m in masks]
    perfect = _npz(tmp_path / "perfect.npz", [r.path for r in test], small, [m.max() for m in small], probability=True)
    distances = _npz(tmp_path / "distances.npz", [r.path for r in test], [40.0 * m + 3.0 for m in small],
                     [m.max() for m in small], probability=False)
    inverted = _npz(tmp_path / "inverted.npz", [r.path for r in test], [1.0 - m for m in small], [-m.max() for m in small],
                    probability=True)
    good = bench.score_method(perfect, splits)
    assert good["image_auroc"] == 1.0 and good["pixel_auroc"] > 0.95 and good["pro"] > 0.9 and good["n_test"] == len(test)
    dist = bench.score_method(distances, splits)  # a monotone rescale of the same map scores the same
    assert dist["pixel_auroc"] == pytest.approx(good["pixel_auroc"], abs=1e-6) and dist["pro"] == pytest.approx(good["pro"], abs=0.02)
    bad = bench.score_method(inverted, splits)
    assert bad["image_auroc"] == 0.0 and bad["pixel_auroc"] < 0.1 and bad["pro"] < 0.05
    wrong = _npz(tmp_path / "wrong.npz", [r.path for r in test[:-1]], small[:-1], [0.0] * (len(test) - 1), probability=True)
    with pytest.raises(SystemExit, match="not the .* test images"):
        bench.score_method(wrong, splits)
    table = bench.table_md([good, bad], ["a note"])
    assert table.count("\n| ") == 2 and "| 1.000 |" in table and "- a note" in table
