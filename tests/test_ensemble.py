"""Ensembles, decision offsets and their metrics; crossval.py end to end on the tiny config."""

import json

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC, MulticlassF1Score

from lineside.cli.crossval import main as crossval_main
from lineside.export.checkpoint import load_inspection_model
from lineside.fusion.ensemble import InspectionEnsemble, fit_grade_bias, grade_metrics
from lineside.fusion.model import InspectionOutput


class _Fixed(torch.nn.Module):
    num_grades, in_chans = 3, 1

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, image):
        return InspectionOutput(self.logits.expand(image.shape[0], -1))


def test_ensemble_averages_probabilities_and_applies_offsets():
    a, b = _Fixed([2.0, 0.0, 0.0]), _Fixed([0.0, 0.0, 3.0])
    x = torch.zeros(2, 1, 8, 8)
    p = InspectionEnsemble([a, b])(x).grade_logits.softmax(-1)
    expected = (torch.tensor([2.0, 0, 0]).softmax(-1) + torch.tensor([0, 0, 3.0]).softmax(-1)) / 2
    assert torch.allclose(p, expected.expand(2, -1), atol=1e-6)
    biased = InspectionEnsemble([a, b], [0.0, 2.0, 0.0])(x).grade_logits
    assert biased.argmax(-1).tolist() == [1, 1] and p.argmax(-1).tolist() == [2, 2]
    with pytest.raises(ValueError, match="shape"):
        InspectionEnsemble([a], [0.0, 1.0])


def test_grade_metrics_match_torchmetrics():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 300)
    labels = rng.integers(0, 4, 300)
    m = grade_metrics(probs, labels)
    p, y = torch.tensor(probs), torch.tensor(labels)
    assert m["macro_f1"] == pytest.approx(MulticlassF1Score(4, average="macro")(p, y).item(), abs=1e-6)
    assert m["acc"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert m["auroc_defective"] == pytest.approx(BinaryAUROC()(1 - p[:, 0], (y > 0).long()).item(), abs=1e-6)
    assert np.array(m["confusion"]).sum() == 300


def test_offsets_recover_an_under_predicted_grade():
    rng = np.random.default_rng(1)
    labels = rng.choice(3, 2000, p=[0.7, 0.2, 0.1])
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), labels] += 1.5
    logits[:, 1:] -= 1.5  # a model that leans towards grade 0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bias = fit_grade_bias(probs, labels, "macro_f1")
    assert bias[0] == 0 and bias[1] > 0.2 and bias[2] > 0.2
    assert grade_metrics(probs, labels, bias)["macro_f1"] > grade_metrics(probs, labels)["macro_f1"] + 0.05
    # a rule that is already best stays plain argmax
    assert fit_grade_bias(np.eye(3)[labels] * 0.9 + 0.05, labels).tolist() == [0, 0, 0]


def test_crossval_folds_ensemble_checkpoint_and_resume(tiny_config, tmp_path, capsys):
    out = tmp_path / "cv"
    assert crossval_main(["--config", str(tiny_config), "--folds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) >= {"cv_oof", "cv_oof_offsets_macro_f1", "test_ensemble", "test_ensemble_offsets"}
    assert report["metrics"]["cv_oof"]["n"] == 32  # 2 folds x 16 held-out cells (tiny limit)
    assert "| cross-validated, out-of-fold, argmax | 32 |" in capsys.readouterr().out

    loaded = load_inspection_model(out / "ensemble.ckpt")
    assert isinstance(loaded.model, InspectionEnsemble) and len(loaded.model.members) == 2
    assert loaded.model.grade_bias.tolist() == pytest.approx(report["grade_bias"])
    folds = [load_inspection_model(out / f"fold{k}" / "fold.ckpt").model for k in range(2)]
    x = torch.randint(0, 255, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        mean = torch.stack([f(x).grade_logits.softmax(-1) for f in folds]).mean(0)
        got = (loaded.model(x).grade_logits - loaded.model.grade_bias).softmax(-1)
    assert torch.allclose(got, mean, atol=1e-5)

    stamp = (out / "fold0" / "fold.ckpt").stat().st_mtime_ns
    crossval_main(["--config", str(tiny_config), "--folds", "2", "--out", str(out)])
    assert (out / "fold0" / "fold.ckpt").stat().st_mtime_ns == stamp  # finished folds are not retrained


def test_crossval_partial_folds_and_ensembles_with_another_recipe(tiny_config, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--config", str(tiny_config), "--folds", "2"]
    crossval_main([*args, "--out", str(a), "--run-folds", "1"])
    assert "1 of 2 folds done ([1])" in capsys.readouterr().out and not (a / "ensemble.ckpt").exists()
    crossval_main([*args, "--out", str(a)])  # fold 1 reused, fold 0 trained, ensemble assembled
    crossval_main([*args, "--out", str(b), "--model.model.init_args.image_encoder.init_args.line_enhance", "3", "--with", str(a)])
    report = json.loads((b / "report.json").read_text())
    assert report["runs"] == [str(b), str(a)]
    ckpt = torch.load(b / "ensemble.ckpt", map_location="cpu", weights_only=False)
    configs = ckpt["lineside"]["ensemble"]["member_configs"]
    assert len(configs) == 4 and configs[0]["init_args"]["image_encoder"]["init_args"]["line_enhance"] == 3
    loaded = load_inspection_model(b / "ensemble.ckpt")
    assert [m.image_encoder.line_enhance for m in loaded.model.members] == [3, 3, 0, 0]
    fold = lambda run, k: np.load(run / f"fold{k}" / "predictions.npz")  # noqa: E731
    probs = np.concatenate([(fold(a, k)["oof_probs"] + fold(b, k)["oof_probs"]) / 2 for k in range(2)])
    labels = np.concatenate([fold(a, k)["oof_labels"] for k in range(2)])
    expected = grade_metrics(probs, labels)  # OOF of the two recipes averaged
    got = report["metrics"]["cv_oof"]
    assert got["confusion"] == expected["confusion"] and got["macro_f1"] == pytest.approx(expected["macro_f1"])
