"""``lineside test`` and ``lineside score`` report the same metrics on the same checkpoint and cells.

Evaluation in the LightningModule runs the deployable module (the one ``score`` and every exported
artefact run) in fp32 with autocast off, so the training precision (bf16-mixed here) does not
move the test figures away from what scoring the same cells reports.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lineside.fusion.ensemble import grade_metrics
from lineside.fusion.grade_metrics import GradeMetrics

CELLS = 192  # test cells of the built-in ELPV split (the first CELLS of it)


def test_grade_metrics_metric_matches_score_definitions() -> None:
    """The Metric ``lineside test`` logs and the function ``lineside score`` reports agree, also
    when a grade is absent (macro-F1 over all K grades) and on unlabelled rows."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), 200).astype(np.float32)
    labels = rng.choice([0, 1, 3, -1], 200, p=[0.5, 0.3, 0.15, 0.05])  # grade 2 absent, some unlabelled
    want = grade_metrics(probs, labels)
    metric = GradeMetrics(4)
    for i in range(0, 200, 64):  # batches, as in a test epoch
        metric.update(torch.from_numpy(probs[i:i + 64]), torch.from_numpy(labels[i:i + 64]))
    got = metric.compute()
    assert int(got["n"]) == want["n"]
    assert float(got["acc"]) == pytest.approx(want["acc"], abs=1e-7)
    assert float(got["macro_f1"]) == pytest.approx(want["macro_f1"], abs=1e-7)
    assert float(got["auroc_defective"]) == pytest.approx(want["auroc_defective"], abs=1e-7)
    np.testing.assert_allclose(got["recall"].numpy(), want["recall"], atol=1e-7)
    assert got["confusion"].tolist() == want["confusion"]
    keep = labels >= 0
    nll = -np.log(np.clip(probs[keep, labels[keep]], 1e-8, None)).mean()
    assert float(got["nll"]) == pytest.approx(nll, rel=1e-5)


def test_lineside_test_and_score_print_the_same_metrics(trained_elpv_ckpt: Path, tmp_path: Path) -> None:
    from lineside.cli.score import main as score_main
    from lineside.fusion.datamodule import InspectionDataModule
    from lineside.fusion.training_cli import main as train_main
    from lineside.vision.elpv import ELPV_GRADE_NAMES

    run = trained_elpv_ckpt.parent.parent
    cells = InspectionDataModule(image_size=64, limit=CELLS).prepare_splits()["test"]
    manifest = tmp_path / "cells.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([[r.path, ELPV_GRADE_NAMES[r.label]] for r in cells])

    cli = train_main(["test", "--config", str(run / "trained_elpv.yaml"), "--ckpt_path", str(trained_elpv_ckpt),
                      "--trainer.precision", "bf16-mixed", "--data.limit", str(CELLS)])
    assert "bf16" in type(cli.trainer.precision_plugin).__name__.lower() or "bf16" in str(cli.trainer.precision)
    test = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    out = tmp_path / "scores.csv"
    assert score_main(["--model", str(trained_elpv_ckpt), "--input", str(manifest), "--output", str(out), "--backend", "torch",
                       "--batch-size", "16", "--num-workers", "0", "--no-progress"]) == 0
    score = json.loads(out.with_name(out.name + ".metrics.json").read_text())

    assert score["n"] == len(cells) == CELLS and score["missing_or_failed"] == 0
    assert len({r.label for r in cells}) >= 3  # a real grading set, not one class
    assert test["test/acc"] == pytest.approx(score["acc"], abs=1e-6)  # float32 logging; one cell is 5e-3
    assert test["test/macro_f1"] == pytest.approx(score["macro_f1"], abs=1e-6)
    assert test["test/auroc_defective"] == pytest.approx(score["auroc_defective"], abs=1e-6)
    for name, recall in zip(ELPV_GRADE_NAMES, score["recall"]):
        assert test[f"test/recall_{name}"] == pytest.approx(recall, abs=1e-6)
    assert 0.3 < score["acc"] < 1.0 and 0.5 < score["auroc_defective"] <= 1.0  # a trained model's figures
