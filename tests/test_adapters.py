"""LoRA adapters: one fit trains an adapter on a frozen base, written small and apart; loaders merge it; a wrong base is refused."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from lineside.export.checkpoint import (
    CheckpointError,
    instantiate_config,
    load_inspection_model,
)
from lineside.export.deployable import build_deployable
from lineside.export.onnx_export import export_onnx
from lineside.fusion.adapters import (
    AdapterError,
    LoraAdapter,
    apply_lora,
    file_sha256,
    load_adapter,
    merge_adapter,
)
from lineside.fusion.checkpoint_file import read_checkpoint
from lineside.runtime import load_backend
from lineside.runtime.open_model import open_model

pytest.importorskip("peft", reason="LoRA training needs peft (pip install 'lineside[adapt]')")

TINY = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"  # the tiny config's model, trained a few steps


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """configs/tiny.yaml fitted for 3 steps as a rank-4 LoRA adapter on the tiny base."""
    from lineside.fusion.training_cli import main as train_main

    tmp = tmp_path_factory.mktemp("adapter")
    base = tmp / "base.ckpt"
    shutil.copy(TINY, base)
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(tmp / "run"), enable_progress_bar=False)
    cfg["model"]["adapter"] = {"base": str(base), "rank": 4, "alpha": 8}
    cfg["model"]["optimizer"]["init_args"]["lr"] = 0.01
    path = tmp / "tiny_adapter.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(path)])
    return tmp / "run", base


def test_adapter_file_is_small_separate_and_records_its_base(adapter_run):
    run, base = adapter_run
    file = run / "adapter.safetensors"
    assert file.is_file() and (run / "adapter.json").is_file()
    assert file.stat().st_size < 0.25 * base.stat().st_size
    tensors, record = load_adapter(file)
    assert record["base_sha256"] == file_sha256(base) and record["rank"] == 4 and record["scale"] == 2.0
    assert json.loads((run / "adapter.json").read_text()) == record
    lora = [k for k in tensors if ".lora_" in k]
    assert any(k.startswith("fusion.encoder.layers.0.self_attn.lora_") for k in lora), "attention q/k/v"
    assert any(k.startswith("fusion.encoder.layers.0.self_attn.out_proj.lora_") for k in lora), "attention output"
    assert any(".conv_pw" in k for k in lora), "backbone 1x1 convs"
    assert all(t.shape[0] == 4 for k, t in tensors.items() if k.endswith("lora_A"))
    full = {k for k in tensors if k.startswith("full.")}
    assert "full.grading_head.fc.weight" in full and all(k.startswith("full.grading_head.") for k in full)
    assert record["trainable"] < 0.2 * record["base_params"]


def test_only_the_adapter_and_head_changed(adapter_run):
    run, base = adapter_run
    before = {k[len("model."):]: v for k, v in read_checkpoint(base)["state_dict"].items() if k.startswith("model.")}
    after = {k[len("model."):]: v for k, v in read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"].items()
             if k.startswith("model.")}
    lora_b = [v for k, v in after.items() if ".lora_B." in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero: some must have trained"
    changed = set()
    for key, value in after.items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer", "")
        assert plain in before, key
        # peft folds the attention update into the in-projection around each forward and takes it out
        # again: float round-off only; every other base tensor (BN statistics included) is bit-identical
        limit = 1e-6 if ".self_attn." in plain else 0.0
        if (value.float() - before[plain].float()).abs().max() > limit:
            changed.add(plain)
    assert changed and all(k.startswith("grading_head.") for k in changed), sorted(changed)


def test_merged_model_and_its_onnx_match_the_unmerged_adapter(adapter_run, tmp_path):
    run, base = adapter_run
    record = json.loads((run / "adapter.json").read_text())
    # the unmerged adapter: the base wrapped with peft LoRA, the fit's weights loaded
    loaded = load_inspection_model(base)
    wrapped = instantiate_config(loaded.config)
    apply_lora(wrapped, LoraAdapter(base=str(base), rank=record["rank"], alpha=record["alpha"]))
    assert record["checkpoint"] == str(run / "checkpoints" / "best.ckpt"), "the adapter of the best checkpoint"
    state = {k[len("model."):]: v for k, v in read_checkpoint(record["checkpoint"])["state_dict"].items() if k.startswith("model.")}
    wrapped.load_state_dict(state)
    wrapped.eval()
    unmerged = build_deployable(dataclasses.replace(loaded, model=wrapped), None, 1)
    merged = load_inspection_model(base, adapter=run / "adapter.safetensors")
    assert merged.adapter.endswith("adapter.safetensors")
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        ref = unmerged.evaluate({"image": images})
        eager = build_deployable(merged, None, 1).evaluate({"image": images})
        plain = build_deployable(loaded, None, 1).evaluate({"image": images})
    assert torch.allclose(eager["grade_probs"], ref["grade_probs"], atol=1e-5)
    with torch.no_grad():  # the fit's own checkpoint loads with its LoRA merged the same way
        own = build_deployable(load_inspection_model(record["checkpoint"]), None, 1).evaluate({"image": images})
    assert torch.allclose(own["grade_probs"], ref["grade_probs"], atol=1e-5)
    assert not torch.allclose(plain["grade_probs"], ref["grade_probs"], atol=1e-4), "the adapter changes the base's outputs"
    result = export_onnx(merged, tmp_path / "onnx", tta_views=1, parity_images=0, simplify=False)
    out = load_backend(result.path, "onnxruntime", "cpu")({"image": images.numpy()})
    np.testing.assert_allclose(out["grade_probs"], ref["grade_probs"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["grade"], ref["grade"].numpy())


def test_adapter_file_alone_opens_its_recorded_base(adapter_run):
    run, base = adapter_run
    backend = open_model(run / "adapter.safetensors", backend="torch")
    direct = open_model(base, backend="torch", adapter=run / "adapter.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    np.testing.assert_allclose(backend({"image": images})["grade_probs"], direct({"image": images})["grade_probs"], atol=1e-6)


def test_an_adapter_is_refused_on_another_base(adapter_run, tmp_path):
    run, base = adapter_run
    other = tmp_path / "other_base.ckpt"
    ckpt = read_checkpoint(base)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match=r"adapter was trained on base .*not on .*other_base\.ckpt"):
        load_inspection_model(other, adapter=run / "adapter.safetensors")
    model = load_inspection_model(base).model
    tensors, record = load_adapter(run / "adapter.safetensors")
    broken = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    tensors["fusion.encoder.layers.0.linear1.lora_B"] = torch.zeros(7, 4)
    save_file(tensors, str(broken), metadata={"lineside": json.dumps(record)})
    with pytest.raises(AdapterError, match="linear1 is 7x32"):
        merge_adapter(model, broken)


def test_adapter_settings_are_checked():
    from lineside.fusion.adapters import prepare_weights

    model = load_inspection_model(TINY).model
    with pytest.raises(ValueError, match="fields: base, rank"):
        prepare_weights(model, adapter={"base": str(TINY), "ranks": 4})
    with pytest.raises(AdapterError, match="match no module"):
        apply_lora(model, LoraAdapter(base=str(TINY), targets=[r"nothing\.here"]))
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(REPO / "missing.safetensors")
