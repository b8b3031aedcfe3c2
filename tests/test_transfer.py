"""Few-label transfer (mono → poly ELPV cells): the MMD and contrastive terms, the cell-type filter, the
labelled pick, and configs/elpv_mono_poly.yaml's recipe running a few steps on tiny data."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from lineside.fusion.datamodule import InspectionDataModule, filter_cell_type
from lineside.fusion.domain_alignment import mmd2
from lineside.fusion.training_cli import main as fit_main
from lineside.fusion.transfer import DomainTransferCriterion, info_nce
from lineside.fusion.transfer_datamodule import TransferDataModule, pick_labelled
from lineside.vision.records import ImageRecord


def test_mmd_is_zero_for_identical_batches_and_grows_with_the_shift() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    assert float(mmd2(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd2(x, x[torch.randperm(64, generator=g)])) == pytest.approx(0.0, abs=1e-6)  # same multiset
    y = torch.randn(64, 16, generator=g)
    small, large = float(mmd2(x, y + 0.5)), float(mmd2(x, y + 2.0))
    assert 0.0 < small < large
    crit = DomainTransferCriterion(16, mmd_weight=1.0)
    assert float(crit(x, x.clone(), None)["loss_mmd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(crit(x, y + 2.0, None)["loss_mmd"]) > 0.01


def test_contrastive_loss_is_lower_for_matching_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 24, generator=g)
    matched = info_nce(a, a + 0.05 * torch.randn(32, 24, generator=g))
    shuffled = info_nce(a, a[torch.randperm(32, generator=g)])
    assert float(matched) < float(shuffled)
    assert float(shuffled) > 0.5 * math.log(63)  # no pairing information: about log(2N - 1)
    crit = DomainTransferCriterion(24, contrastive_weight=1.0)
    terms = crit(None, a, a + 0.05 * torch.randn(32, 24, generator=g))
    assert set(terms) == {"loss_contrast"} and torch.isfinite(terms["loss_contrast"])
    terms["loss_contrast"].backward()
    assert all(p.grad is not None for p in crit.projector.parameters())
    with pytest.raises(ValueError, match="two"):
        info_nce(a, a[:8])


def test_type_filter_keeps_only_the_asked_cells() -> None:
    records = [ImageRecord(f"c{i}.png", i % 4, None, "monocrystalline" if i < 5 else "polycrystalline") for i in range(12)]
    mono = filter_cell_type(records, "mono")
    poly = filter_cell_type(records, "poly")
    assert len(mono) == 5 and {r.text for r in mono} == {"monocrystalline"}
    assert len(poly) == 7 and {r.text for r in poly} == {"polycrystalline"}
    with pytest.raises(ValueError, match="no 'thin-film' cells"):
        filter_cell_type(records, "thin-film")


def test_elpv_data_module_type_filter_keeps_the_module_blocks() -> None:
    full = InspectionDataModule(image_size=64, num_workers=0).prepare_splits()
    mono = InspectionDataModule(image_size=64, num_workers=0, cell_type="mono").prepare_splits()
    poly = InspectionDataModule(image_size=64, num_workers=0, cell_type="poly").prepare_splits()
    for split in ("train", "val", "test"):
        assert {r.text for r in mono[split]} == {"monocrystalline"} and {r.text for r in poly[split]} == {"polycrystalline"}
        assert len(mono[split]) + len(poly[split]) == len(full[split])  # a cell's split does not depend on the filter
        assert {r.path for r in poly[split]} <= {r.path for r in full[split]}


def test_labelled_pick_follows_the_grades_and_the_seed() -> None:
    labels = [0] * 120 + [1] * 40 + [2] * 6 + [3] * 34
    pick = pick_labelled(labels, 50, seed=0)
    counts = Counter(labels[i] for i in pick)
    assert len(pick) == len(set(pick)) == 50 and set(counts) == {0, 1, 2, 3}
    assert counts[0] == pytest.approx(30, abs=1) and counts[2] >= 1
    assert pick_labelled(labels, 50, seed=0) == pick and pick_labelled(labels, 50, seed=1) != pick


def test_transfer_data_module_serves_labelled_unlabelled_and_source() -> None:
    dm = TransferDataModule(image_size=32, batch_size=4, num_workers=0, labels=20, label_seed=0)
    splits = dm.prepare_splits()
    assert len(splits["train"]) == 20 and {r.text for r in splits["train"]} == {"polycrystalline"}
    assert all(r.label == -1 for r in dm.extra["unlabelled"]) and {r.text for r in dm.extra["source"]} == {"monocrystalline"}
    assert not {r.path for r in splits["train"]} & {r.path for r in dm.extra["unlabelled"]}
    assert {r.text for r in splits["test"]} == {"polycrystalline"}
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labelled", "source", "unlabelled"}
    unl = next(iter(loaders["unlabelled"]))
    assert unl["image"].shape == unl["image2"].shape == (4, 1, 32, 32) and (unl["grade"] == -1).all()


def test_transfer_config_runs_a_few_steps(tmp_path: Path) -> None:
    """configs/elpv_mono_poly.yaml with the tiny model, 3 steps, from a tiny mono-cell source checkpoint."""
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    src = dict(tiny, trainer=dict(tiny["trainer"], default_root_dir=str(tmp_path / "mono"), max_steps=2, callbacks=tiny["trainer"]["callbacks"][:1]))
    src["model"] = dict(tiny["model"], tta_views=1)
    src["data"] = dict(tiny["data"], cell_type="mono")
    (tmp_path / "mono.yaml").write_text(yaml.safe_dump(src))
    fit_main(["fit", "--config", str(tmp_path / "mono.yaml")])
    source_ckpt = tmp_path / "mono" / "checkpoints" / "last.ckpt"

    cfg = yaml.safe_load((REPO / "configs" / "elpv_mono_poly.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "transfer"), max_steps=3, val_check_interval=None,
                          check_val_every_n_epoch=1, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False)
    cfg["model"]["model"] = tiny["model"]["model"]
    cfg["model"]["init_from"] = str(source_ckpt)
    cfg["model"]["domain_transfer"]["init_args"]["embed_dim"] = 32
    cfg["data"]["init_args"].update(image_size=32, batch_size=4, num_workers=0, labels=16)
    (tmp_path / "transfer.yaml").write_text(yaml.safe_dump(cfg))
    cli = fit_main(["fit", "--config", str(tmp_path / "transfer.yaml")])
    assert cli.trainer.global_step == 3
    logged = cli.trainer.logged_metrics
    assert "train/loss_mmd" in logged and "train/loss_contrast" in logged
    assert torch.isfinite(logged["train/loss_mmd"]) and float(logged["train/loss_contrast"]) > 0
    from lineside.export.checkpoint import load_inspection_model

    # the result is a plain model: it loads for score / export without the projection head
    loaded = load_inspection_model(tmp_path / "transfer" / "checkpoints" / "last.ckpt")
    assert not any("projector" in k for k in loaded.model.state_dict())
