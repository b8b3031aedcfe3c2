"""One import name and one command: ``lineside.*`` subpackages, the ``lineside`` CLI, checkpoints
written before the namespace change."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lineside.export.checkpoint import CheckpointError, instantiate_config, load_inspection_model

PRE_NAMESPACE_CKPT = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"


def test_subpackages_live_under_one_name():
    import lineside.export
    import lineside.fusion
    import lineside.pointcloud
    import lineside.vision

    assert lineside.fusion.InspectionModel.__module__ == "lineside.fusion.model"
    assert lineside.vision.ImageEncoder.__module__ == "lineside.vision.image_encoder"
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print([u.find_spec(n) is None for n in ('vision', 'fusion', 'export', 'score', 'train', 'crossval')])"],
        cwd="/", capture_output=True, text=True, timeout=60,
    )
    assert out.stdout.strip() == "[True, True, True, True, True, True]", "no top-level modules leak into site-packages"


def test_checkpoint_written_before_the_namespace_change_loads():
    ckpt = torch.load(PRE_NAMESPACE_CKPT, map_location="cpu", weights_only=False)
    assert ckpt["lineside"]["model_config"]["class_path"] == "fusion.InspectionModel"  # the old name
    loaded = load_inspection_model(PRE_NAMESPACE_CKPT)
    assert type(loaded.model).__module__ == "lineside.fusion.model"
    assert loaded.class_names == ["ok", "mild", "moderate", "severe"] and loaded.image_size == 64
    w = ckpt["state_dict"]["model.grading_head.fc.weight"]
    assert torch.equal(loaded.model.grading_head.fc.weight, w)
    probs = loaded.model(torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)).grade_logits.softmax(-1)
    assert probs.shape == (2, 4) and torch.isfinite(probs).all()


def test_unknown_class_path_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot import 'nowhere.Model'"):
        instantiate_config({"class_path": "nowhere.Model", "init_args": {}})


def test_lineside_command_lists_subcommands_and_dispatches():
    out = subprocess.run([sys.executable, "-m", "lineside", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("fit|validate|test|predict", "score", "export", "station", "bench", "crossval"):
        assert cmd in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lineside", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "lineside", "export", "pdf"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown format 'pdf'" in bad.stderr


def test_checkout_scripts_still_run():
    out = subprocess.run([sys.executable, "score.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--input" in out.stdout
