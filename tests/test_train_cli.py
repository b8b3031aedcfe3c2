"""`lineside fit|test|predict` through the real Lightning CLI with configs/tiny.yaml: fit a few
steps, then test; class names owned by the data; one run folder per fit."""

import csv
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO
from lineside.cli import main as lineside_main
from lineside.export.checkpoint import load_inspection_model
from lineside.fusion.training_cli import main


def _lineside(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["lineside"]


def _metrics(run_dir):
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return rows


def test_fit_then_test_on_the_checkpoint(tiny_config, tmp_path, capsys):
    main(["fit", "--config", str(tiny_config)])
    run = tmp_path / "run"
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    assert (run / "config.yaml").is_file(), "the resolved config is saved in the run folder"
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


def test_readme_own_images_command_keeps_the_given_class_order(tiny_config, image_folder, tmp_path):
    # README "Your own images": class names given to the data, the grading head sized to match
    own = ["--config", str(tiny_config), "--data.root", str(image_folder), "--data.class_names", "[ok, crack]"]
    assert lineside_main(["fit", *own, "--model.model.init_args.grading_head.init_args.num_grades", "2"]) == 0
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["lineside"]["class_names"] == ["ok", "crack"]  # the given order, not the sorted folder names
    assert ckpt["hyper_parameters"]["class_names"] == ["ok", "crack"]  # module and data hparams agree
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["class_names"] == ["ok", "crack"] and "class_names" not in saved["model"]

    # predict on the checkpoint without repeating the names or num_grades: the checkpoint's order is kept
    assert lineside_main(["predict", "--config", str(tiny_config), "--data.root", str(image_folder), "--ckpt_path", str(best)]) == 0
    (preds,) = (tmp_path / "run" / "logs").rglob("predictions.csv")
    rows = list(csv.DictReader(open(preds)))
    assert list(rows[0])[-2:] == ["p_ok", "p_crack"] and {r["grade_name"] for r in rows} <= {"ok", "crack"}


def test_class_names_and_num_grades_disagree_is_a_clear_error(tiny_config, image_folder, tmp_path):
    with pytest.raises(ValueError, match="num_grades 2"):
        main(["fit", "--config", str(tiny_config), "--data.root", str(image_folder), "--data.class_names", "[ok, crack]"])
    assert not (tmp_path / "run").exists(), "stopped before anything was built or written"


def test_default_root_dir_moves_the_whole_run_and_a_fit_never_clobbers_another(tiny_config, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(a)])
    main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(b), "--model.tta_views", "1"])
    for run, views in ((a, 2), (b, 1)):
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "logs" / "version_0" / "metrics.csv").is_file()
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["trainer"]["default_root_dir"] == str(run) and saved["overwrite"] is False
        assert saved["trainer"]["callbacks"][0]["init_args"]["dirpath"] is None  # follows the run folder when reused
        assert _lineside(run / "checkpoints" / "best.ckpt")["tta_views"] == views
    assert not (tmp_path / "run").exists(), "nothing written to the config's own default_root_dir"

    # a second fit into a: refused, a's checkpoints untouched
    best_a = (a / "checkpoints" / "best.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(a), "--trainer.max_steps", "2"])
    assert (a / "checkpoints" / "best.ckpt").read_bytes() == best_a
    assert not (a / "logs" / "version_1").exists()

    # the saved config runs again elsewhere; resuming a run continues in its folder
    main(["fit", "--config", str(a / "config.yaml"), "--trainer.default_root_dir", str(tmp_path / "c"), "--trainer.max_steps", "2"])
    assert (tmp_path / "c" / "checkpoints" / "last.ckpt").is_file() and (a / "checkpoints" / "best.ckpt").read_bytes() == best_a
    main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(b),
          "--ckpt_path", str(b / "checkpoints" / "last.ckpt"), "--trainer.max_steps", "4"])
    assert torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4

    # --overwrite replaces the run's checkpoints; its earlier logs stay
    main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(a), "--model.tta_views", "1", "--overwrite"])
    assert _lineside(a / "checkpoints" / "best.ckpt")["tta_views"] == 1
    assert (a / "logs" / "version_0" / "metrics.csv").is_file() and (a / "logs" / "version_1" / "metrics.csv").is_file()

    # test / predict on b's checkpoint log beside b, whatever the config's default_root_dir
    main(["test", "--config", str(tiny_config), "--ckpt_path", str(b / "checkpoints" / "best.ckpt")])
    main(["predict", "--config", str(tiny_config), "--ckpt_path", str(b / "checkpoints" / "best.ckpt")])
    assert len(list((b / "logs").rglob("test_confusion_matrix.csv"))) == 1
    assert len(list((b / "logs").rglob("predictions.csv"))) == 1
    assert not (tmp_path / "run").exists()


def test_print_config_runs_as_a_subprocess():
    out = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: lineside.fusion.InspectionModel" in out.stdout and "tf_efficientnet_lite0" in out.stdout
