"""MultiTaskDataModule: named data modules, each with its own splits, image size and labels, trained as
one model; batches come from one member each, in proportion to the weights; a mixed batch's loss is
the sum of each criterion on its labelled samples only; the tiny multi-task config fits via the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
from lineside.fusion.datamodule import InspectionDataModule
from lineside.fusion.detection_datamodule import DetectionDataModule
from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.localization_head import LocalizationHead
from lineside.fusion.multitask_datamodule import MemberBatches, MultiTaskDataModule
from lineside.vision import ImageEncoder
from lineside.vision.box_formats import NEU_DET_CLASSES

REPO = Path(__file__).resolve().parents[1]
D = 32


def _neu_det_tree(root: Path, per_class: int = 4) -> Path:
    """A tiny NEU-DET layout: IMAGES/<class>_<n>.jpg + ANNOTATIONS/<class>_<n>.xml, one box each."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(NEU_DET_CLASSES):
        for n in range(per_class):
            stem = f"{name}_{n}"
            (root / "IMAGES").mkdir(parents=True, exist_ok=True)
            (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "IMAGES" / f"{stem}.jpg")
            x, y = 4 + 2 * n, 6 + c
            (root / "ANNOTATIONS" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}</filename><size><width>48</width><height>48</height></size>"
                f"<object><name>{name}</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + 20}</xmax>"
                f"<ymax>{y + 16}</ymax></bndbox></object></annotation>")
    return root


def _cells_manifest(root: Path, n: int = 40) -> Path:
    """path,label CSV of ``n`` grey cells, grades ok / crack alternating."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"c{i}.png")
            w.writerow([f"c{i}.png", ("ok", "crack")[i % 2]])
    return root / "cells.csv"


def _members(tmp_path: Path, batch_size: int = 4) -> dict:
    cells = InspectionDataModule(manifest=str(_cells_manifest(tmp_path / "cells")), class_names=["ok", "crack"], image_size=64,
                                 batch_size=batch_size, num_workers=0, augment="none", block_size=4)
    boxes = DetectionDataModule(dataset="neu_det", root=str(_neu_det_tree(tmp_path / "neu")), image_size=96, batch_size=batch_size,
                                val_fraction=0.25, test_fraction=0.25, num_workers=0)
    return {"cells": cells, "boxes": boxes}


def test_batches_come_from_one_member_each_in_proportion_to_the_weights(tmp_path: Path) -> None:
    dm = MultiTaskDataModule(_members(tmp_path), weights={"cells": 2.0, "boxes": 1.0}, steps_per_epoch=12, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 12 and loader.counts() == {"cells": 8, "boxes": 4}
    first = list(loader)
    sizes = [tuple(b["image"].shape[-2:]) for b in first]
    # each batch one member's: one image size, and the labels of that member only
    assert sizes.count((64, 64)) == 8 and sizes.count((96, 96)) == 4
    assert all(("boxes" in b) == (b["image"].shape[-1] == 96) for b in first)
    assert all(len({tuple(i.shape) for i in b["image"]}) == 1 for b in first)
    order = [("cells", "boxes")[s == (96, 96)] for s in sizes]
    assert order == loader.order(0)
    # deterministic with the seed, a new order next epoch, the same counts
    again = MultiTaskDataModule(_members(tmp_path / "b"), weights={"cells": 2.0, "boxes": 1.0}, steps_per_epoch=12, seed=3)
    again.setup("fit")
    assert again.train_dataloader().order(0) == order
    assert loader.order(1) != order and sorted(loader.order(1)) == sorted(order)
    # weight 0 / left out: never trained on, still validated
    only = MultiTaskDataModule(_members(tmp_path / "c"), weights={"cells": 1.0})
    only.setup("fit")
    assert {tuple(b["image"].shape[-2:]) for b in only.train_dataloader()} == {(64, 64)}
    assert [tuple(next(iter(v))["image"].shape[-2:]) for v in only.val_dataloader()] == [(64, 64), (96, 96)]


def test_proportions_settle_rounding_and_bad_names_are_refused(tmp_path: Path) -> None:
    mb = MemberBatches({"a": [1], "b": [2], "c": [3]}, {"a": 1.0, "b": 1.0, "c": 1.0}, steps=10)
    assert sum(mb.counts().values()) == 10 and sorted(mb.counts().values()) == [3, 3, 4]
    assert list(MemberBatches({"a": [1, 2]}, {"a": 1.0}, steps=5)) == [1, 2, 1, 2, 1]  # a member that runs out starts over
    with pytest.raises(ValueError, match="not in data.datasets"):
        MultiTaskDataModule(_members(tmp_path), weights={"cels": 1.0})
    with pytest.raises(ValueError, match="positive training weight"):
        MemberBatches({"a": [1]}, {"a": 0.0}, steps=1)


def test_each_task_is_configured_from_its_own_member(tmp_path: Path) -> None:
    dm = MultiTaskDataModule(_members(tmp_path))
    assert [t for t, _ in dm.task_data()] == ["grading", "localization"]
    assert dm.for_task("grading").num_classes == 2 and dm.for_task("localization").num_classes == 6
    assert dm.for_task("grasp") is None and dm.image_size == 64
    module = InspectionModule(_model(num_grades=2, num_classes=6))

    class _Trainer:
        datamodule = dm

    module._trainer = _Trainer()  # what Lightning sets before setup()
    module.setup("fit")
    assert module.class_names == ["ok", "crack"] and module.box_class_names == list(NEU_DET_CLASSES)
    module = InspectionModule(_model(num_grades=4, num_classes=6))
    module._trainer = _Trainer()
    with pytest.raises(ValueError, match="has 2 classes"):
        module.setup("fit")


# --------------------------------------------------------------------------- the loss of a mixed batch


def _model(num_grades: int = 4, num_classes: int = 3) -> InspectionModel:
    torch.manual_seed(0)
    encoder = ImageEncoder(backbone="test_efficientnet", embed_dim=D, in_chans=1, feature_levels=[-2, -1], pretrained=False)
    return InspectionModel(encoder, FusionTransformer(D, depth=1, num_heads=2, dropout=0.0), GradingHead(D, num_grades),
                           localization_head=LocalizationHead(D, num_classes=num_classes, level_index=0, num_convs=1)).eval()


def _mixed_batch() -> dict:
    """4 samples: 0 graded only, 1 boxes + mask only, 2 both, 3 neither."""
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(4, 64, 64, dtype=torch.uint8)
    mask[1, 10:30, 12:40] = 1
    mask[2, 30:50, 20:34] = 1
    return {
        "image": torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8, generator=g),
        "grade": torch.tensor([1, -1, 3, -1]),
        "boxes": torch.tensor([[[0.0, 0, 0, 0]], [[12, 10, 40, 30]], [[20, 30, 34, 50]], [[0, 0, 0, 0]]]),
        "labels": torch.tensor([[-1], [0], [2], [-1]]),
        "box_mask": torch.tensor([[False], [True], [True], [False]]),
        "has_boxes": torch.tensor([False, True, True, False]),
        "mask": mask,
        "has_mask": torch.tensor([False, True, True, False]),
    }


def _subset(batch: dict, keep: list[int]) -> dict:
    return {k: v[keep] for k, v in batch.items()}


def test_a_mixed_batch_sums_each_criterion_over_its_labelled_samples_only() -> None:
    module = InspectionModule(_model())
    batch = _mixed_batch()
    losses = module._losses(module.model(batch["image"]), batch)
    # each criterion on the samples that carry its labels (the model is per-sample in eval mode)
    grades = _subset(batch, [0, 2])
    want_grading = module.criteria["grading"](module.model(grades["image"]), grades)["loss"]
    located = _subset(batch, [1, 2])
    want_localization = module.criteria["localization"](module.model(located["image"]), located)["loss"]
    torch.testing.assert_close(losses["loss_grading"], want_grading)
    torch.testing.assert_close(losses["loss_localization"], want_localization)
    torch.testing.assert_close(losses["loss"], want_grading + want_localization)
    assert float(want_grading.detach()) > 0 and float(want_localization.detach()) > 0


@pytest.mark.parametrize("task, unlabelled", [("grading", [1, 3]), ("localization", [0, 3])])
def test_a_head_gets_no_gradient_from_samples_without_its_labels(task: str, unlabelled: list[int]) -> None:
    """Changing the images of the samples a task has no labels for changes neither its loss nor its
    head's gradient."""
    module = InspectionModule(_model())
    head = module.model.grading_head if task == "grading" else module.model.localization_head

    def loss_and_grads(batch: dict):
        module.model.zero_grad()
        loss = module._losses(module.model(batch["image"]), batch)[f"loss_{task}"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    batch = _mixed_batch()
    loss, grads = loss_and_grads(batch)
    other = dict(batch, image=batch["image"].clone())
    other["image"][unlabelled] = 255 - other["image"][unlabelled]
    loss2, grads2 = loss_and_grads(other)
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads)  # the labelled samples do reach the head


# --------------------------------------------------------------------------- the tiny multi-task config, through the CLI


@pytest.mark.parametrize("weighting", ["sum", "uncertainty"])
def test_tiny_multitask_config_fits_and_logs_both_tasks(tmp_path: Path, weighting: str) -> None:
    from lineside.fusion.training_cli import main

    cfg = yaml.safe_load((REPO / "configs" / "tiny_multitask.yaml").read_text())
    members = cfg["data"]["init_args"]["datasets"]
    members["cells"]["init_args"]["manifest"] = str(_cells_manifest(tmp_path / "cells"))
    members["boxes"]["init_args"]["root"] = str(_neu_det_tree(tmp_path / "neu"))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["model"]["task_weighting"] = weighting
    path = tmp_path / "tiny_multitask.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == cfg["trainer"]["max_steps"]
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"train/loss_grading", "train/loss_localization", "val/acc", "val/map_50"} <= set(header)
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    for key in ("train/loss_grading", "train/loss_localization"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(np.isfinite(values))
    assert cli.model.class_names == ["ok", "crack"] and cli.model.box_class_names == list(NEU_DET_CLASSES)
    assert ("train/weight_grading" in header) == (weighting == "uncertainty")
    if weighting == "uncertainty":  # the log-variances train: the weights moved off 1
        weights = cli.model.task_weighting.weights()
        assert all(abs(float(w) - 1.0) > 1e-4 for w in weights.values())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- configs/el_dual.yaml


def test_el_dual_resolves_and_keeps_each_data_sets_split(shared_data: Path, capsys) -> None:
    """ELPV grades on the module-block split + el_cracks masks split by module, one model with both heads."""
    import importlib

    from lineside.fusion.training_cli import main
    from lineside.vision.elpv import elpv_records

    if not (shared_data / "el_cracks").is_dir():
        pytest.skip(f"{shared_data / 'el_cracks'} is absent")
    config = REPO / "configs" / "el_dual.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])  # every class_path and init_arg resolves
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed["model"]["model"]["init_args"]["heads"]) == {"segmentation"}
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    members = {}
    for name, spec in data["datasets"].items():
        module, _, cls = spec["class_path"].rpartition(".")
        members[name] = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    dm = MultiTaskDataModule(members, **{k: v for k, v in data.items() if k != "datasets"})
    assert [t for t, _ in dm.task_data()] == ["grading", "segmentation"]
    dm.setup("fit")
    index = {r.path: i for i, r in enumerate(elpv_records())}
    blocks = {s: {index[r.path] // 60 for r in recs} for s, recs in members["elpv"].splits.items()}
    assert not (blocks["train"] & blocks["val"]) and not (blocks["train"] & blocks["test"]) and not (blocks["val"] & blocks["test"])
    modules = {s: {r.module for r in recs} for s, recs in members["el_cracks"].splits.items()}
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"]) and not (modules["val"] & modules["test"])
    assert all(len(modules[s]) for s in ("train", "val", "test"))


def test_a_mixed_batch_of_grades_and_segmentation_masks_sums_each_over_its_own_samples() -> None:
    """The el_dual pair: grades on samples 0, 2; masks (``has_seg``) on samples 1, 2."""
    from lineside.fusion.segmentation_head import SegmentationHead

    torch.manual_seed(0)
    encoder = ImageEncoder(backbone="test_efficientnet", embed_dim=D, in_chans=1, feature_levels=[-1], dense_levels=[1, 2],
                           pretrained=False)
    model = InspectionModel(encoder, FusionTransformer(D, depth=1, num_heads=2, dropout=0.0), GradingHead(D, 4),
                            heads={"segmentation": SegmentationHead(D, in_channels=encoder.map_channels, num_classes=4, decoder_dim=16)})
    module = InspectionModule(model.eval())
    batch = _mixed_batch()
    seg = torch.zeros(4, 64, 64, dtype=torch.int64)
    seg[1, 10:30, 12:14] = 3  # a crack
    seg[2, :, 30:33] = 4  # a busbar
    seg[2, 40:50, 40:60] = 1  # a dark area
    batch = {"image": batch["image"], "grade": batch["grade"], "seg_mask": seg, "has_seg": torch.tensor([False, True, True, False])}
    losses = module._losses(module.model(batch["image"]), batch)
    grades, masks = _subset(batch, [0, 2]), _subset(batch, [1, 2])
    want_grading = module.criteria["grading"](module.model(grades["image"]).grade_logits, grades)["loss"]
    seg_task = next(t for t in module.model.tasks if t.name == "segmentation")
    want_seg = module.criteria["segmentation"](seg_task.raw(module.model(masks["image"])), masks)["loss"]
    torch.testing.assert_close(losses["loss_grading"], want_grading)
    torch.testing.assert_close(losses["loss_segmentation"], want_seg)
    torch.testing.assert_close(losses["loss"], want_grading + want_seg)
