"""ONNX export: uint8 frames in, named outputs, metadata beside it, parity on real images, TensorRT operator check."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO
from lineside.runtime import BackendError, OnnxRuntimeBackend, TorchBackend, load_backend
from lineside.export.checkpoint import LoadedModel, load_inspection_model
from lineside.export.deployable import build_deployable, parse_size
from lineside.export.metadata import file_sha256, read_metadata
from lineside.cli.export import onnx_main as main
from lineside.export.onnx_export import export_onnx
from lineside.export.parity import FLOAT_FACTORS, TOLERANCES, Tolerance, check_parity, compare_outputs, parse_tolerance, tolerance_for
from lineside.export.trt_ops import unsupported_ops
from lineside.runtime.verify import verify_artefact

TINY = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported for 96x80 frames (resized to its 64 px inside the graph)."""
    out = tmp_path_factory.mktemp("onnx")
    return export_onnx(TINY, out, input_size="96x80", batch_sizes=(1, 4), parity_images=8, verify=verify_artefact)


def test_graph_takes_uint8_frames_and_gives_named_outputs(exported):
    model = onnx.load(str(exported.path))
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 96, 80]
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outs == {"grade_probs": onnx.TensorProto.FLOAT, "grade": onnx.TensorProto.INT64, "grade_heatmap": onnx.TensorProto.FLOAT}
    ops = {n.op_type for n in model.graph.node}
    assert "Gather" in ops and "Resize" not in ops, "the integer resize to the training size is inside the graph"


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
    r = export_onnx(loaded, tmp_path, parity_images=6, verify=verify_artefact)
    assert r.parity is not None and r.ok, r.parity.table()
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
    # the message names the output, its value and limit, and the flags that accept it or skip the check
    assert "grade_probs max|Δ|" in captured.err and "> limit" in captured.err
    assert "--parity-tolerance grade_probs=" in captured.err and "--parity-images 0" in captured.err
    assert (tmp_path / "parity.json").is_file() and not json.loads((tmp_path / "parity.json").read_text())["ok"]


def test_parity_tolerance_flag_overrides_and_rejects_bad_text(tmp_path, capsys):
    # a limit no float can meet fails the export; an unknown output name is an error, not silently ignored
    assert main(["--ckpt", str(TINY), "--out", str(tmp_path / "a"), "--parity-images", "4", "--parity-tolerance", "grade_probs=0,grade_heatmap=0"]) == 1
    err = capsys.readouterr().err
    assert "parity FAILED" in err and "--parity-tolerance" in err
    assert main(["--ckpt", str(TINY), "--out", str(tmp_path / "b"), "--parity-images", "4", "--parity-tolerance", "grade_prob=0.1"]) == 1
    assert "no output or kind named grade_prob" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ckpt", str(TINY), "--out", str(tmp_path / "c"), "--parity-tolerance", "grade_probs=big"])
    assert "is not a number" in capsys.readouterr().err


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
            return {"grade_probs": np.tile([0.7, 0.3], (n, 1)) + self.shift, "grade": g, "boxes": np.zeros((n, 3, 4))}

    imgs = np.zeros((10, 1, 8, 8), np.uint8)
    ok = check_parity(Fake(0, 0), Fake(1e-6, 0), imgs, "fp32", batch_size=4)
    assert ok.ok and [r.output for r in ok.rows] == ["grade_probs", "grade", "boxes"]
    bad = check_parity(Fake(0, 0), Fake(1e-6, 1), imgs, "fp32", batch_size=4)
    assert not bad.ok and "3 of 10 differ" in bad.table()  # the first frame of each of 3 batches


# --------------------------------------------------------------------------- parity rules (export.parity)
GRADING = [{"name": "grade_probs", "kind": "float"}, {"name": "grade", "kind": "decoded"}, {"name": "grade_heatmap", "kind": "heatmap"}]


def _grading(probs, heat_shift=0.0):
    probs = np.asarray(probs, np.float64)
    heat = np.linspace(0, 1, len(probs) * 4).reshape(len(probs), 1, 2, 2) + heat_shift
    return {"grade_probs": probs, "grade": probs.argmax(1), "grade_heatmap": heat}


def test_docstring_table_matches_the_tolerances():
    """The module's one table (decisions, floor, float / heatmap / box factors × u, slack) is the data."""
    import re

    from lineside.export import parity

    table = {m[0]: m for m in re.findall(r"^\s+(fp32|fp16|bf16|int8)\s+(\S+)\s+=\s+(\S+)\s+(?:≥ )?(\d+) %\s+(\S+)\s+(.+?)\s{2,}(.+?)\s{2,}(.+?)\s{2,}(\d+)×$",
                                         parity.__doc__, re.M)}
    assert set(table) == set(TOLERANCES)
    for name, tol in TOLERANCES.items():
        _, _, u, share, floor, flt, heat, box, slack = table[name]
        assert float(u.replace("1/", "")) and abs(eval(u) - tol.unit_roundoff) / tol.unit_roundoff < 0.02  # "6.0e-8", "1/254"
        assert int(share) == round(100 * tol.min_agreement) and float(floor) == tol.atol and int(slack) == tol.slack
        for text, kind in ((flt, "float"), (heat, "heatmap")):
            limit, _ = tol.float_limit("x", kind, 1.0)
            assert float(text.removesuffix("·s")) == pytest.approx(limit, rel=0.05), (name, kind)
        expected_box = FLOAT_FACTORS["box"] * tol.unit_roundoff
        shown = re.search(r"([\d.e-]+)·s", box)
        assert (shown is None and tol.corner_limit("boxes", 224.0) == tol.box_px) or float(shown[1]) == pytest.approx(expected_box, rel=0.05)


def test_reduced_precision_is_judged_on_decisions_first():
    ref = _grading([[0.9, 0.05, 0.03, 0.02], [0.1, 0.7, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1]])
    # the numbers: grade_probs 1.05e-2 off, every grade the same → fp16 passes (fp32 does not)
    cand = _grading(np.asarray(ref["grade_probs"]) + [[-0.0105, 0.0105, 0, 0]] * 3)
    fp16 = {r.output: r for r in compare_outputs(ref, cand, GRADING, "fp16")}
    assert all(r.ok for r in fp16.values()) and fp16["grade_probs"].limit == pytest.approx(32 * 2**-11 * 0.9)
    assert not all(r.ok for r in compare_outputs(ref, cand, GRADING, "fp32"))
    # above the derived limit but within the 2× slack: passes only while every decision agrees
    limit = fp16["grade_probs"].limit
    above = _grading(np.asarray(ref["grade_probs"]) + [[-1.5 * limit, 1.5 * limit, 0, 0]] * 3)
    row = compare_outputs(ref, above, GRADING, "fp16")[0]
    assert row.ok and "every decision row passing" in row.detail
    flipped = dict(above, grade=above["grade"].copy())
    flipped["grade"][0] = 3  # a real flip (the reference's margin 0.85 is no near tie)
    rows = {r.output: r for r in compare_outputs(ref, flipped, GRADING, "fp16")}
    assert not rows["grade"].ok and not rows["grade_probs"].ok and "only while every decision row passes" in rows["grade_probs"].detail
    far = _grading(np.asarray(ref["grade_probs"]) + [[-2.5 * limit, 2.5 * limit, 0, 0]] * 3)
    assert not compare_outputs(ref, far, GRADING, "fp16")[0].ok  # far beyond the limit fails even with the same grades
    assert compare_outputs(ref, _grading(ref["grade_probs"], heat_shift=0.2), GRADING, "fp16")[2].ok  # heatmap limit 0.125, 2× slack
    assert not compare_outputs(ref, _grading(ref["grade_probs"], heat_shift=0.3), GRADING, "fp16")[2].ok


def test_near_tie_flips_are_not_decision_changes():
    ref = _grading([[0.50, 0.49, 0.01, 0.0]] + [[0.9, 0.1, 0.0, 0.0]] * 9)
    cand = _grading([[0.49, 0.50, 0.01, 0.0]] + [[0.9, 0.1, 0.0, 0.0]] * 9)
    row = compare_outputs(ref, cand, GRADING, "fp32")[1]
    assert not row.ok and row.value == 0.9  # fp32: a 0.01 margin is far beyond float noise
    row = compare_outputs(ref, cand, GRADING, "fp16")[1]
    assert row.ok and row.value == 0.9 and "1 near ties of grade_probs" in row.detail


def test_top_grasp_is_a_decision_by_position():
    specs = [{"name": "grasp_position", "kind": "float", "atol": 1e-3, "ranked_by": "grasp_score"}, {"name": "grasp_score", "kind": "float"}]
    pos = np.array([[[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]]] * 2)
    ref = {"grasp_position": pos, "grasp_score": np.array([[0.9, 0.5, 0.1], [0.6, 0.59995, 0.1]])}
    # lower ranks reordered, the top grasp 0.5 mm off: agrees
    moved = {"grasp_position": pos[:, [0, 2, 1]] + 5e-4, "grasp_score": ref["grasp_score"][:, [0, 2, 1]]}
    moved["grasp_score"] = ref["grasp_score"].copy()
    rows = compare_outputs(ref, moved, specs, "fp32")
    assert rows[0].metric == "top-1" and rows[0].ok and rows[0].value == 1.0
    # frame 1 is a near tie (scores 5e-5 apart): the candidate's best may be the reference's second
    swapped = {"grasp_position": pos.copy(), "grasp_score": ref["grasp_score"]}
    swapped["grasp_position"][1, [0, 1]] = pos[1, [1, 0]]
    assert compare_outputs(ref, swapped, specs, "fp32")[0].ok
    swapped["grasp_position"][0, [0, 1]] = pos[0, [1, 0]]  # frame 0 is no tie (0.9 vs 0.5): a different grasp
    row = compare_outputs(ref, swapped, specs, "fp32")[0]
    assert not row.ok and row.value == 0.5 and "1 moved" in row.detail


def test_parse_tolerance_and_overrides():
    assert parse_tolerance("grade_probs=0.02, heatmap=0.2") == {"grade_probs": 0.02, "heatmap": 0.2}
    assert parse_tolerance("2,grade=0.9") == {"factor": 2.0, "grade": 0.9}
    for bad in ("grade_probs=x", "=1", "1,2", "grade=-1"):
        with pytest.raises(ValueError, match="--parity-tolerance"):
            parse_tolerance(bad)
    tol = tolerance_for("fp16", "2,grade_heatmap=0.3,agreement=0.5,box_px=3")
    assert tol.float_limit("grade_probs", "float", 1.0)[0] == pytest.approx(2 * 32 * 2**-11)
    assert tol.float_limit("grade_heatmap", "heatmap", 1.0) == (0.3, True)
    assert tol.agreement("grade", "decoded") == 0.5 and tol.corner_limit("boxes", 224.0) == 3.0
    assert tolerance_for("fp16") is TOLERANCES["fp16"] and tolerance_for("fp16", tol) is tol
    # an output's own atol (its units) is a floor, never a ceiling
    assert TOLERANCES["fp32"].float_limit("grasp_position", "float", 0.3, 1e-3)[0] == 1e-3
