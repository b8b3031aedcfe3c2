"""Structured pruning: fewer backbone channels, same outputs' shapes, a safe checkpoint that rebuilds, ONNX parity, fine-tune."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from lineside.export.checkpoint import instantiate_config, load_inspection_model
from lineside.export.deployable import build_deployable
from lineside.export.onnx_export import export_onnx
from lineside.fusion.checkpoint_file import read_checkpoint, unsafe_globals
from lineside.fusion.pruning import count_parameters, fit_to_state, prune_backbone
from lineside.runtime import load_backend

from lineside.cli.prune import main as prune_main

pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (pip install 'lineside[adapt]')")

TINY = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"
IMAGES = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_pruned_model_is_smaller_with_the_same_output_shapes():
    loaded = load_inspection_model(TINY)
    model = loaded.model
    with torch.no_grad():
        before = model(image=IMAGES.float())
    widths = {n: m.out_channels for n, m in model.image_encoder.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    counts = prune_backbone(model, 0.5, 64, round_to=1)
    assert counts["after"] < 0.8 * counts["before"] and counts["after"] == count_parameters(model)
    after_widths = {n: m.out_channels for n, m in model.image_encoder.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert sum(after_widths.values()) < 0.7 * sum(widths.values())
    assert model.image_encoder.proj[0].out_channels == 32, "the tokens keep the fusion transformer's width"
    model.eval()
    with torch.no_grad():
        after = model(image=IMAGES.float())
    assert after.grade_logits.shape == before.grade_logits.shape and torch.isfinite(after.grade_logits).all()
    # the re-shaping a loader does: a model built from the config takes the pruned weights
    rebuilt = instantiate_config(loaded.config)
    assert fit_to_state(rebuilt, model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(image=IMAGES.float()).grade_logits, after.grade_logits)


def test_ratio_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        prune_backbone(load_inspection_model(TINY).model, 1.0)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pruned")
    out = tmp / "pruned.ckpt"
    assert prune_main(["--model", str(TINY), "--ratio", "0.5", "--out", str(out)]) == 0
    return out


def test_pruned_checkpoint_loads_weights_only_and_rebuilds(pruned):
    ckpt = read_checkpoint(pruned)  # weights_only=True
    assert unsafe_globals(pruned) == []
    record = ckpt["lineside"]["pruned"]
    assert record["ratio"] == 0.5 and record["params_after"] < record["params_before"]
    loaded = load_inspection_model(pruned)
    assert count_parameters(loaded.model) == record["params_after"]
    original = load_inspection_model(TINY)
    with torch.no_grad():
        a = build_deployable(loaded, None, 1).evaluate({"image": IMAGES})
        b = build_deployable(original, None, 1).evaluate({"image": IMAGES})
    assert a["grade_probs"].shape == b["grade_probs"].shape and torch.allclose(a["grade_probs"].sum(1), torch.ones(3))


def test_pruned_checkpoint_exports_to_onnx_with_parity(pruned, tmp_path):
    from lineside.runtime.verify import verify_artefact

    result = export_onnx(pruned, tmp_path / "onnx", tta_views=1, parity_images=4, verify=verify_artefact, simplify=False)
    assert result.ok, result.parity.table()
    loaded = load_inspection_model(pruned)
    with torch.no_grad():
        ref = build_deployable(loaded, None, 1).evaluate({"image": IMAGES})
    out = load_backend(result.path, "onnxruntime", "cpu")({"image": IMAGES.numpy()})
    np.testing.assert_allclose(out["grade_probs"], ref["grade_probs"].numpy(), atol=1e-5)


def test_prune_refuses_a_bad_output_name(tmp_path, capsys):
    assert prune_main(["--model", str(TINY), "--ratio", "0.5", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "must end in .ckpt" in capsys.readouterr().err


def test_fine_tuning_from_a_pruned_checkpoint_keeps_its_channels(pruned, tmp_path):
    from lineside.fusion.training_cli import main as train_main

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), enable_progress_bar=False, max_steps=2)
    cfg["model"]["init_from"] = str(pruned)
    path = tmp_path / "tiny_pruned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(path)])
    tuned = load_inspection_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert count_parameters(tuned.model) == read_checkpoint(pruned)["lineside"]["pruned"]["params_after"]
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
