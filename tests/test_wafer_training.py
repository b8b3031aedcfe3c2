"""Wafer maps through training: configs/tiny_wafer.yaml fits a few steps with the Lightning CLI and
is tested; the MMD alignment loss of the transfer benchmark."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml
from conftest import REPO
from lineside.fusion.domain_alignment import GaussianMMD, mmd2
from lineside.fusion.training_cli import main
from lineside.vision.wafer_io import WM811K_CLASSES


@pytest.fixture
def tiny_wafer(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "tiny_wafer.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    out = tmp_path / "tiny_wafer.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_tiny_wafer_config_fits_and_tests(tiny_wafer, tmp_path):
    cli = main(["fit", "--config", str(tiny_wafer)])
    assert cli.datamodule.class_names == list(WM811K_CLASSES)
    run = tmp_path / "run"
    rows = list(csv.DictReader(next(run.rglob("metrics.csv")).read_text().splitlines()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns something in 8 steps
    f1 = [float(r["val/macro_f1"]) for r in rows if r.get("val/macro_f1")]
    assert f1 and all(0.0 <= v <= 1.0 for v in f1)
    best = run / "checkpoints" / "best.ckpt"
    assert torch.load(best, map_location="cpu", weights_only=False)["lineside"]["class_names"] == list(WM811K_CLASSES)
    metrics = main(["test", "--config", str(tiny_wafer), "--ckpt_path", str(best)]).trainer.callback_metrics
    for key in ("test/macro_f1", "test/acc", "test/auroc_defective"):  # defective = any pattern but 'none'
        assert 0.0 <= float(metrics[key]) <= 1.0


def test_mmd_is_zero_for_identical_batches_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    assert float(mmd2(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd2(x, x[torch.randperm(32, generator=g)])) == pytest.approx(0.0, abs=1e-6)  # same multiset
    same = float(mmd2(x, torch.randn(32, 16, generator=g)))  # another sample of the same distribution
    shifts = [float(mmd2(x, torch.randn(32, 16, generator=g) + s)) for s in (0.5, 1.0, 2.0)]
    assert same < shifts[0] < shifts[1] < shifts[2] and shifts[0] > 0.0
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mmd2(x, torch.randn(4, 3))


def test_mmd_gradient_pulls_target_features_towards_the_source():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(24, 8, generator=g)
    tgt = (torch.randn(24, 8, generator=g) + 1.5).requires_grad_(True)
    loss_fn = GaussianMMD()
    before, gap = float(loss_fn(src, tgt)), float((tgt.mean(0) - src.mean(0)).norm())
    opt = torch.optim.Adam([tgt], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        loss_fn(src, tgt).backward()
        opt.step()
    assert float(loss_fn(src, tgt)) < 0.3 * before
    assert float((tgt.mean(0) - src.mean(0)).norm()) < 0.5 * gap
