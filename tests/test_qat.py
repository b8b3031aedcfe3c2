"""Quantization-aware training: fake quantization on the INT8 export's grid, a QAT fine-tune through the
Lightning CLI (tiny config), its Q/DQ and QOperator graphs in parity with the fake-quant model at the
int8 limits, and a TensorRT-RTX engine built from the Q/DQ graph (ahead of time, on the CPU)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import REPO
from lineside.export.checkpoint import load_inspection_model
from lineside.export.qat_export import export_qat, load_qat_model
from lineside.export.quantize import QuantizeError, _int32_bias_inputs, graph_precision
from lineside.fusion.qat import (
    QAT_KEY,
    freeze_qat,
    is_qat,
    prepare_qat,
    qat_state,
    quantized_modules,
    set_observers,
)
from lineside.fusion.training_cli import main as fit_main
from lineside.runtime.verify import verify_artefact

TINY = Path(__file__).parent / "data" / "pre_namespace_tiny.ckpt"


def _tiny_model():
    return load_inspection_model(TINY).model


def test_prepare_keeps_weight_keys_and_quantizes_on_the_int8_grid() -> None:
    model = _tiny_model()
    keys = set(model.state_dict())
    names = prepare_qat(model, float_convs=3)
    assert is_qat(model) and len(names) == len(quantized_modules(model)) > 0
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(n in names for n in convs[:3]) and all(n in names for n in convs[3:])  # the first 3 stay float
    assert keys <= set(model.state_dict())  # float weights keep their keys; quantizer buffers are added
    x = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        model(image=x)  # observers see the weights and inputs
    set_observers(model, False)
    m = quantized_modules(model)[names[0]]
    scale = m.weight_quant.scale.reshape(-1, *[1] * (m._parameters["weight"].ndim - 1))
    q = m.weight / scale  # the weight reads back fake-quantized: integers within ±127
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127.001
    assert not torch.equal(m.weight, m._parameters["weight"])
    with pytest.raises(ValueError, match="already fake-quantized"):
        prepare_qat(model)


def test_frozen_copy_matches_the_fake_quant_model_and_leaves_it_alone() -> None:
    model = _tiny_model()
    prepare_qat(model)
    x = torch.randint(0, 256, (6, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        model.eval()(image=x)
        set_observers(model, False)
        before = qat_state(model)
        frozen = freeze_qat(model)
        a, b = model(image=x).grade_logits, frozen(image=x).grade_logits
    assert torch.allclose(a, b, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in qat_state(model).items())
    plain = _tiny_model().eval()
    with torch.no_grad():
        assert not torch.allclose(plain(image=x).grade_logits, a, atol=1e-6)  # quantization does change the model


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml fine-tuned 4 steps with the QAT callback, from a tiny float fit."""
    root = tmp_path_factory.mktemp("qat")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["model"]["tta_views"] = 1
    cfg["trainer"]["default_root_dir"] = str(root / "float")
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]
    (root / "float.yaml").write_text(yaml.safe_dump(cfg))
    fit_main(["fit", "--config", str(root / "float.yaml")])
    cfg["trainer"]["default_root_dir"] = str(root / "qat")
    cfg["trainer"]["max_steps"] = 4
    cfg["trainer"]["callbacks"].insert(0, {
        "class_path": "lineside.fusion.qat_training.QuantizationAwareTraining",
        "init_args": {"init_from": str(root / "float" / "checkpoints" / "last.ckpt"), "calibration_batches": 2,
                      "freeze_observers_epoch": 1, "freeze_bn_epoch": 1},
    })
    (root / "qat.yaml").write_text(yaml.safe_dump(cfg))
    fit_main(["fit", "--config", str(root / "qat.yaml")])
    return root / "qat" / "checkpoints" / "last.ckpt"


def test_qat_fit_writes_quantizers_beside_float_weights(qat_run: Path) -> None:
    ckpt = torch.load(qat_run, map_location="cpu", weights_only=False)
    qat = ckpt[QAT_KEY]
    assert qat["spec"]["float_convs"] == 3 and qat["state"]
    assert not any(".weight_quant." in k or ".input_quant." in k for k in ckpt["state_dict"])
    scales = [v for k, v in qat["state"].items() if k.endswith("input_quant.scale")]
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() and (s != 1.0).all() for s in scales)  # calibrated, not the init 1.0
    plain = load_inspection_model(qat_run)  # a QAT checkpoint loads as a float model everywhere
    assert not is_qat(plain.model)
    loaded = load_qat_model(qat_run, frozen=False)
    assert is_qat(loaded.model) and len(quantized_modules(loaded.model)) == len(scales)
    # the fine-tune moved the weights away from the float start
    start = torch.load(qat_run.parents[2] / "float" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    moved = [k for k, v in ckpt["state_dict"].items() if k in start and v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved


def test_a_float_checkpoint_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="quickstart_qat.yaml"):
        export_qat(TINY, tmp_path)


@pytest.fixture(scope="module")
def qat_graphs(qat_run: Path, tmp_path_factory):
    return export_qat(qat_run, tmp_path_factory.mktemp("qat_export"), parity_images=32, calib_images=32, verify=verify_artefact)


def test_qdq_graph_has_int8_weights_float_biases_and_parity(qat_graphs) -> None:
    model = onnx.load(str(qat_graphs.paths["qdq"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # weights: DQ of INT8 initializers only
    assert graph_precision(model) == "int8" and _int32_bias_inputs(model) == []
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert int8 and any(n.op_type == "DequantizeLinear" and n.input[0] in int8 for n in model.graph.node)
    zero_points = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name not in
                   {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}]
    assert all(np.all(z == 0) for z in zero_points)  # symmetric: zero point 0 everywhere
    report = qat_graphs.parity["qdq"]
    assert report.ok and report.precision == "int8" and report.n_images == 32
    assert qat_graphs.metadata["qdq"]["quantization"]["weights_folded"] > 0


def test_qoperator_graph_runs_integer_kernels_with_parity(qat_graphs) -> None:
    model = onnx.load(str(qat_graphs.paths["qoperator"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QLinearConv"] > 0 and graph_precision(model) == "int8-qoperator"
    assert qat_graphs.parity["qoperator"].ok
    assert qat_graphs.paths["qoperator"].stat().st_size < (qat_graphs.paths["qdq"].parent / "fp32" / "model.onnx").stat().st_size


def test_tensorrt_rtx_builds_the_qat_graph(qat_graphs, tmp_path: Path) -> None:
    from lineside.export.tensorrt import build_engine, import_tensorrt

    if import_tensorrt("tensorrt_rtx") is None:
        pytest.skip("no TensorRT-RTX builder here: pip install '.[tensorrt]'")
    r = build_engine(qat_graphs.paths["qdq"], tmp_path / "trt", "int8", (1, 4), flavour="tensorrt_rtx", gpu_arch="8.6")
    assert r.path.is_file() and r.path.stat().st_size > 0 and r.metadata["precision"] == "int8"


def test_export_int8_command_takes_the_qat_path_unless_told_otherwise(qat_run: Path, tmp_path: Path, capsys) -> None:
    from lineside.export.metadata import read_metadata

    from lineside.cli.export import int8_main

    assert int8_main(["--ckpt", str(qat_run), "--out", str(tmp_path / "qat"), "--formats", "qdq", "--parity-images", "8"]) == 0
    assert "scales learnt in QAT" in capsys.readouterr().out
    assert read_metadata(tmp_path / "qat" / "model.qdq.onnx")["quantization"]["calibration"]["method"] == "qat"
    assert int8_main(["--ckpt", str(qat_run), "--out", str(tmp_path / "ptq"), "--formats", "qdq", "--parity-images", "0",
                      "--calib-images", "8", "--post-training"]) == 0
    assert read_metadata(tmp_path / "ptq" / "model.qdq.onnx")["quantization"]["calibration"]["method"] == "minmax"
