"""ONNX export: uint8 frames in, named outputs, metadata beside it, parity on real images, TensorRT operator check."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO
from lineside.export.backends import BackendError, OnnxRuntimeBackend, TorchBackend, load_backend
from lineside.export.checkpoint import LoadedModel, load_inspection_model
from lineside.export.deployable import build_deployable, parse_size
from lineside.export.metadata import file_sha256, read_metadata
from lineside.export.onnx_export import export_onnx, main
from lineside.export.parity import TOLERANCES, Tolerance, check_parity
from lineside.export.trt_ops import unsupported_ops

TINY = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported for 96x80 frames (resized to its 64 px inside the graph)."""
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(TINY, out, input_size="96x80", batch_sizes=(1, 4), parity_images=8)


def test_graph_takes_uint8_frames_and_gives_named_outputs(exported):
    model = onnx.load(str(exported.path))
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 96, 80]
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outs == {"grade_probs": onnx.TensorProto.FLOAT, "grade": onnx.TensorProto.INT64, "grade_heatmap": onnx.TensorProto.FLOAT}
    assert any(n.op_type == "Resize" for n in model.graph.node), "the resize to the training size is inside the graph"


def test_parity_passed_on_real_images_and_metadata_round_trips(exported):
    assert exported.ok and exported.parity.n_images == 8
    rows = {r.output: r for r in exported.parity.rows}
    assert rows["grade_probs"].value < 1e-4 and rows["grade"].value == 1.0
    meta = read_metadata(exported.path)
    assert meta == json.loads((exported.path.parent / "metadata.json").read_text())
    assert meta["artefact"] == "model.onnx" and meta["artefact_sha256"] == file_sha256(exported.path)
    assert meta["model_sha256"] == file_sha256(TINY)
    assert meta["class_names"] == ["ok", "mild", "moderate", "severe"]
    assert meta["inputs"][0] == {"name": "image", "dtype": "uint8", "shape": ["N", 1, 96, 80], "kind": "input",
                                 "description": meta["inputs"][0]["description"]}
    assert [(o["name"], o["dtype"], o["shape"], o["kind"]) for o in meta["outputs"]] == [
        ("grade_probs", "float32", ["N", 4], "float"), ("grade", "int64", ["N"], "decoded"),
        ("grade_heatmap", "float32", ["N", 1, 2, 2], "heatmap")]
    pre = meta["preprocessing"]
    assert pre["input_size"] == [96, 80] and pre["train_size"] == [64, 64] and pre["tta_views"] == 2
    assert len(pre["normalisation"]["scale"]) == 1
    assert meta["training_config"]["data"]["image_size"] == 64
    assert {"lineside", "torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    assert meta["opset"] == 18 and meta["tensorrt_unsupported_ops"] == {} and meta["parity"]["ok"]


def test_dynamic_batch_and_the_same_result_as_eager(exported):
    ort = load_backend(exported.path)
    assert isinstance(ort, OnnxRuntimeBackend) and ort.input_size == (96, 80)
    eager = TorchBackend(TINY, input_size="96x80")
    rng = np.random.default_rng(0)
    for n in (1, 3, 5):
        x = rng.integers(0, 256, (n, 1, 96, 80), dtype=np.uint8)
        a, b = ort(x), eager(x)
        assert a["grade_probs"].shape == (n, 4) and a["grade"].dtype == np.int64
        np.testing.assert_allclose(a["grade_probs"], b["grade_probs"], atol=1e-5)
        np.testing.assert_array_equal(a["grade"], b["grade"])
        np.testing.assert_allclose(a["grade_probs"].sum(1), 1.0, atol=1e-5)


def test_backend_rejects_wrong_frames_with_a_clear_message(exported):
    ort = load_backend(exported.path)
    with pytest.raises(BackendError, match=r"expects frames of shape \(N, 1, 96, 80\)"):
        ort(np.zeros((1, 1, 64, 64), np.uint8))
    with pytest.raises(BackendError, match="expects uint8"):
        ort(np.zeros((1, 1, 96, 80), np.float32))
    with pytest.raises(BackendError, match="model file not found"):
        load_backend(exported.path.parent / "nope.onnx")


def test_ensemble_with_views_and_offsets_exports_with_parity(tmp_path):
    from lineside.fusion.ensemble import InspectionEnsemble

    base = load_inspection_model(TINY)
    other = load_inspection_model(TINY).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ens = InspectionEnsemble([base.model, other], grade_bias=[0.0, 0.3, -0.2, 0.1]).eval()
    loaded = LoadedModel(ens, base.class_names, 64, 1, tta_views=4, config={}, source=str(TINY))
    r = export_onnx(loaded, tmp_path, parity_images=6)
    assert r.ok, r.parity.table()
    eager = build_deployable(loaded)
    x = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    ort = OnnxRuntimeBackend(r.path)(x.numpy())
    ref = eager.run(x)
    np.testing.assert_allclose(ort["grade_probs"], ref["grade_probs"].numpy(), atol=1e-5)
    assert r.metadata["preprocessing"]["tta_views"] == 4


def test_parity_failure_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(atol=-1.0, min_agreement=1.0))  # nothing can pass
    assert main(["--ckpt", str(TINY), "--out", str(tmp_path), "--parity-images", "4"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "parity FAILED" in captured.err
    assert (tmp_path / "parity.json").is_file() and not json.loads((tmp_path / "parity.json").read_text())["ok"]


def test_unsupported_operators_are_listed(tmp_path):
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("BitShift", ["a_u", "s"], ["b"], direction="LEFT"),
        helper.make_node("Cast", ["a"], ["a_u"], to=TensorProto.UINT8),
        helper.make_node("MyOp", ["b"], ["y"], domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("s", TensorProto.UINT8, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1])])
    model = helper.make_model(graph)
    assert unsupported_ops(model) == {"BitShift": 1, "com.example::MyOp": 1}


def test_parse_size():
    assert parse_size("300") == (300, 300) and parse_size("300x200") == (300, 200) and parse_size(None) is None
    with pytest.raises(ValueError, match="HxW"):
        parse_size("big")


def test_parity_report_compares_every_listed_output():
    class Fake:
        def __init__(self, shift, flip):
            self.shift, self.flip = shift, flip
            self.output_specs = [{"name": "grade_probs", "kind": "float"}, {"name": "grade", "kind": "decoded"},
                                 {"name": "boxes", "kind": "float"}]

        def describe(self):
            return "fake"

        def __call__(self, x):
            n = len(x)
            g = np.zeros(n, np.int64)
            g[:1] = self.flip
            return {"grade_probs": np.full((n, 2), 0.5) + self.shift, "grade": g, "boxes": np.zeros((n, 3, 4))}

    imgs = np.zeros((10, 1, 8, 8), np.uint8)
    ok = check_parity(Fake(0, 0), Fake(1e-6, 0), imgs, "fp32", batch_size=4)
    assert ok.ok and [r.output for r in ok.rows] == ["grade_probs", "grade", "boxes"]
    bad = check_parity(Fake(0, 0), Fake(1e-6, 1), imgs, "fp32", batch_size=4)
    assert not bad.ok and "3 of 10 differ" in bad.table()  # the first frame of each of 3 batches
