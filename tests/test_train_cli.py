"""train.py through the real Lightning CLI with configs/tiny.yaml: fit a few steps, then test."""

import csv
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lineside.export.checkpoint import load_inspection_model
from lineside.fusion.training_cli import main


def _metrics(run_dir):
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return rows


def test_fit_then_test_on_the_checkpoint(tiny_config, tmp_path, capsys):
    main(["fit", "--config", str(tiny_config)])
    run = tmp_path / "run"
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    assert list(run.rglob("config.yaml")), "the resolved config is saved in the run folder"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 2  # saved at the last validation (2 steps per epoch)
    assert ckpt["lineside"]["class_names"] == ["ok", "mild", "moderate", "severe"]
    losses = [float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")]
    assert len(losses) == 3 and all(l == l for l in losses)

    cli = main(["test", "--config", str(tiny_config), "--ckpt_path", str(best)])
    metrics = cli.trainer.callback_metrics
    for key in ("test/acc", "test/macro_f1", "test/auroc_defective", "test/recall_ok"):
        assert key in metrics and 0.0 <= float(metrics[key]) <= 1.0
    out = capsys.readouterr().out
    assert "confusion matrix" in out
    assert list(run.rglob("test_confusion_matrix.csv"))

    main(["predict", "--config", str(tiny_config), "--ckpt_path", str(best)])
    preds = list(csv.DictReader(open(max(run.rglob("predictions.csv"), key=lambda p: p.stat().st_mtime))))
    assert len(preds) == 16 and {p["grade_name"] for p in preds} <= {"ok", "mild", "moderate", "severe"}
    assert all(abs(sum(float(p[f"p_{n}"]) for n in ("ok", "mild", "moderate", "severe")) - 1) < 1e-4 for p in preds)

    # the pure model comes back without Lightning and reproduces the module's weights
    loaded = load_inspection_model(best)
    sd = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    w = loaded.model.grading_head.fc.weight
    assert torch.equal(w, sd["model.grading_head.fc.weight"])


def test_user_image_folder_with_only_config_changes(tiny_config, image_folder, tmp_path):
    cli = main([
        "fit", "--config", str(tiny_config), "--data.root", str(image_folder),
        "--model.model.init_args.grading_head.init_args.num_grades", "2",
    ])
    assert cli.datamodule.class_names == ["crack", "ok"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_class_count_mismatch_is_a_clear_error(tiny_config, image_folder):
    with pytest.raises(ValueError, match="num_grades"):
        main(["fit", "--config", str(tiny_config), "--data.root", str(image_folder)])


def test_print_config_runs_as_a_subprocess():
    out = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: lineside.fusion.InspectionModel" in out.stdout and "tf_efficientnet_lite0" in out.stdout
