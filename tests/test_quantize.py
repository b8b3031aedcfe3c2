"""INT8 graphs calibrated on real ELPV cells: Q/DQ for TensorRT, QOperator for ONNX Runtime (tiny checkpoint)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from lineside.runtime import OnnxRuntimeBackend, load_backend
from lineside.export.calibration import real_images
from lineside.export.metadata import read_metadata, write_metadata
from lineside.export.onnx_export import export_onnx
from lineside.export.parity import TOLERANCES
from lineside.export.quantize import (
    FLOAT_CONVS,
    INT8_FORMATS,
    QuantizeError,
    _int32_bias_inputs,
    float_ends,
    float_inside,
    graph_precision,
    quantize_onnx,
)
from lineside.cli.export import int8_main as main
from lineside.runtime.verify import verify_artefact

TINY = Path(__file__).parent / "data" / "pre_namespace_tiny.ckpt"


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(TINY, out, parity_images=0).path


@pytest.fixture(scope="module")
def int8(fp32_onnx: Path):
    return quantize_onnx(fp32_onnx, calib_images=64, parity_images=48, verify=verify_artefact)


def test_both_graphs_written_with_own_metadata(int8, fp32_onnx: Path) -> None:
    assert set(int8.paths) == {"qdq", "qoperator"}
    for fmt, path in int8.paths.items():
        assert path.name == INT8_FORMATS[fmt][0] and path.parent == fp32_onnx.parent
        assert path.with_name(path.name + ".json").is_file()
        meta = read_metadata(path)
        assert meta["artefact"] == path.name and meta["precision"] == "int8"
        assert meta["quantization"]["format"] == {"qdq": "QDQ", "qoperator": "QOperator"}[fmt]
        cal = meta["quantization"]["calibration"]
        assert cal["n_images"] == 64 and cal["split"] == "train" and "ELPV train blocks" in cal["source"]
        assert meta["parity"]["ok"] is True
    # the fp32 graph keeps the folder's metadata.json
    assert read_metadata(fp32_onnx)["precision"] == "fp32"
    assert read_metadata(fp32_onnx.parent)["artefact"] == "model.onnx"


def test_graphs_load_and_run_in_onnxruntime(int8) -> None:
    images, _ = real_images(None, (64, 64), 1, 8, split="val")
    for path in int8.paths.values():
        for backend in (load_backend(path), OnnxRuntimeBackend(path)):
            assert backend.precision == "int8" and backend.name == "onnxruntime-int8"
            out = backend(images)
            assert out["grade_probs"].shape == (8, 4) and out["grade_probs"].dtype == np.float32
            assert out["grade"].shape == (8,) and out["grade"].dtype == np.int64
            np.testing.assert_allclose(out["grade_probs"].sum(1), 1.0, atol=1e-5)


def test_qdq_graph_is_what_tensorrt_takes(int8) -> None:
    model = onnx.load(str(int8.paths["qdq"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert graph_precision(model) == "int8"
    assert _int32_bias_inputs(model) == []  # no int32-quantized biases (TensorRT's parser rejects them)
    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in model.graph.node)
    # symmetric: every zero point is 0 (TensorRT takes no other)
    zp = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert zp[n.input[2]].dtype == np.int8 and not zp[n.input[2]].any()
    assert read_metadata(int8.paths["qdq"])["tensorrt_unsupported_ops"] == {}


def test_qoperator_graph_has_integer_kernels(int8) -> None:
    model = onnx.load(str(int8.paths["qoperator"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QLinearConv"] == 17 - FLOAT_CONVS and ops["Conv"] == FLOAT_CONVS  # the first convolutions stay float
    assert graph_precision(model) == "int8-qoperator"
    assert int8.paths["qoperator"].stat().st_size < 0.5 * int8.source.stat().st_size


def test_uint8_input_and_decoders_stay_float(int8) -> None:
    for path in int8.paths.values():
        model = onnx.load(str(path))
        producer = {o: n for n in model.graph.node for o in n.output}
        first = [n for n in model.graph.node if "image" in n.input]
        assert first and all(n.op_type in ("Cast", "Shape") for n in first)
        assert producer["grade"].op_type == "ArgMax"
        assert producer["grade_probs"].op_type in ("ReduceMean", "Softmax")
        before, after = float_ends(onnx.load(str(int8.source)))
        assert "node__to_copy" in before and "node_argmax" in after


def test_float_inside_keeps_the_stem_and_head_adds(fp32_onnx: Path) -> None:
    model = onnx.load(str(fp32_onnx))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    first, head = float_inside(model, 2)
    assert first == convs[:2]
    last = max(i for i, n in enumerate(model.graph.node) if n.op_type == "Conv")
    assert head and all(model.graph.node[i].op_type in ("Add", "Mul") for i, n in enumerate(model.graph.node) if n.name in head)
    assert all(i > last for i, n in enumerate(model.graph.node) if n.name in head)
    assert float_inside(model, 0)[0] == []


def test_parity_within_int8_tolerance_on_real_images(int8) -> None:
    tol = TOLERANCES["int8"]
    assert set(int8.parity) == {"qdq", "qoperator"}
    for report in int8.parity.values():
        assert report.ok, report.table()
        assert report.n_images == 48 and "torch" in report.reference
        rows = {r.output: r for r in report.rows}
        assert report.precision == "int8" and rows["grade"].limit == tol.min_agreement
        # float limits derived from INT8's unit roundoff and the output's scale (probabilities ≤ 1)
        assert tol.atol < rows["grade_probs"].limit <= 32 / 254 and rows["grade_probs"].value <= tol.slack * rows["grade_probs"].limit


def test_refuses_a_graph_that_is_not_fp32(fp32_onnx: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    shutil.copy(fp32_onnx, fake)
    meta = dict(read_metadata(fp32_onnx), precision="fp16")
    write_metadata(meta, fake)
    with pytest.raises(QuantizeError, match="fp16 graph.*from the fp32 graph"):
        quantize_onnx(fake, calib_images=8, parity_images=0)
    with pytest.raises(QuantizeError, match="formats"):
        quantize_onnx(fp32_onnx, tmp_path / "x", formats=("qint4",))


def test_cli_with_own_calibration_folder(fp32_onnx: Path, image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8"
    rc = main(["--onnx", str(fp32_onnx), "--out", str(out), "--calib", str(image_folder / "train"), "--calib-images", "12",
               "--parity-images", "12", "--formats", "qoperator"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "calibrated on 12 real frames" in text and "model.qoperator.onnx" in text and "PASS" in text
    meta = read_metadata(out / "model.qoperator.onnx")
    assert meta["quantization"]["calibration"]["source"] == str(image_folder / "train")
    assert json.loads((out / "parity.int8.json").read_text())["qoperator"]["ok"] is True
    assert not (out / "model.qdq.onnx").exists()
