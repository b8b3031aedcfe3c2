"""Text as a modality of the grading model: per-sample texts in training, a prompt baked into the exported graph."""

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from lineside.export.checkpoint import load_inspection_model
from lineside.export.deployable import build_deployable
from lineside.fusion.training_cli import main as train_main
from lineside.runtime.verify import verify_artefact


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_run")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp)
    cfg["trainer"]["max_steps"] = 2
    m = cfg["model"]["model"]["init_args"]
    m["fusion"]["init_args"]["modalities"] = {"image": 2, "text": 1}
    m["text_encoder"] = {"class_path": "lineside.fusion.TextEncoder", "init_args": {"embed_dim": 32, "max_length": 8}}
    path = tmp / "tiny_text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(path)])
    return tmp / "checkpoints" / "last.ckpt"


def test_text_model_trains_on_elpv_cell_types_and_uses_the_text(text_ckpt):
    loaded = load_inspection_model(text_ckpt)
    model = loaded.model
    assert model.text_encoder is not None
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        mono = model(image, text=["monocrystalline"] * 2).grade_logits
        poly = model(image, text=["polycrystalline"] * 2).grade_logits
        none = model(image).grade_logits
    assert not torch.allclose(mono, poly), "the cell type changes the grade logits"
    assert not torch.allclose(mono, none)


def test_prompt_is_baked_into_the_exported_graph_with_parity(text_ckpt, tmp_path):
    from lineside.runtime import OnnxRuntimeBackend
    from lineside.export.onnx_export import export_onnx

    loaded = load_inspection_model(text_ckpt)
    r = export_onnx(loaded, tmp_path, parity_images=4, text_prompt="monocrystalline", verify=verify_artefact)
    assert r.ok, r.parity.table()
    assert r.metadata["preprocessing"]["text_prompt"] == "monocrystalline"
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    out = OnnxRuntimeBackend(r.path)(x)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(x), text=["monocrystalline"] * 3).grade_logits.float()
        views = build_deployable(loaded, text_prompt="monocrystalline").run(torch.from_numpy(x))
    np.testing.assert_allclose(out["grade_probs"], views["grade_probs"].numpy(), atol=1e-5)
    if loaded.tta_views == 1:
        np.testing.assert_allclose(out["grade_probs"], ref.softmax(-1).numpy(), atol=1e-5)
