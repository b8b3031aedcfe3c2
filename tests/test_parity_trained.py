"""Parity of a trained model at reduced precision: the grading model of ``trained_elpv_ckpt`` (EfficientNet-Lite0
trained a few hundred steps on real ELPV cells) exported to ONNX fp16 and INT8 Q/DQ passes with the default
derived limits on real val-block cells, its grades agree, a tight ``--parity-tolerance`` fails naming the flag,
and TensorRT-RTX builds an fp16 engine from the graph (ahead of time: the engine needs a GPU to run, so the
parity it ships with is the fp16 graph's, checked in ONNX Runtime)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from lineside.export.checkpoint import load_inspection_model
from lineside.export.metadata import read_metadata
from lineside.export.onnx_export import export_onnx
from lineside.export.parity import TOLERANCES
from lineside.export.quantize import quantize_onnx
from lineside.runtime import OnnxRuntimeBackend, TorchBackend
from lineside.runtime.verify import verify_artefact

from lineside.cli.export import int8_main

PARITY_IMAGES = 32


@pytest.fixture(scope="module")
def graphs(trained_elpv_ckpt: Path, tmp_path_factory) -> dict:
    """The trained checkpoint as fp32 (no parity), fp16 and INT8 Q/DQ graphs, the last two checked with
    the default limits of their precision against the eager model on ELPV val-block cells."""
    root = tmp_path_factory.mktemp("trained_graphs")
    loaded = load_inspection_model(trained_elpv_ckpt)
    fp16 = export_onnx(loaded, root / "fp16", batch_sizes=(1, 8), fp16=True, parity_images=PARITY_IMAGES, verify=verify_artefact)
    fp32 = export_onnx(loaded, root / "fp32", batch_sizes=(1, 8), parity_images=0)
    int8 = quantize_onnx(fp32.path, calib_images=64, parity_images=PARITY_IMAGES, formats=("qdq",), loaded=loaded, verify=verify_artefact)
    return {"fp16": fp16, "fp32": fp32, "int8": int8, "ckpt": trained_elpv_ckpt}


def _rows(report) -> dict:
    return {r.output: r for r in report.rows}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_passes_on_decisions_with_derived_float_limits(graphs, precision: str) -> None:
    report = graphs["fp16"].parity if precision == "fp16" else graphs["int8"].parity["qdq"]
    assert report is not None and report.ok, report.table()
    assert report.precision == precision and report.n_images == PARITY_IMAGES and "torch" in report.reference
    tol = TOLERANCES[precision]
    rows = _rows(report)
    assert set(rows) == {"grade_probs", "grade", "grade_heatmap"}
    # decisions first: the grades agree, and every grade that differs is a near tie of grade_probs
    # (the fixture's short training is not bit-reproducible across machines, so a tie can fall either way)
    grade = rows["grade"]
    assert grade.metric == "agreement" and grade.ok
    if grade.value < tol.min_agreement:
        m = re.search(r"\((\d+) of \d+ differ; (\d+) near ties", grade.detail)
        assert m and m.group(1) == m.group(2), grade.detail
    # floats at a limit from the precision's unit roundoff and the output's scale (probabilities ≤ 1)
    probs = rows["grade_probs"]
    assert tol.atol < probs.limit <= 32 * tol.unit_roundoff + 1e-12
    assert probs.value <= tol.slack * probs.limit
    # a trained model's reduced-precision probabilities really move: beyond fp32's float noise
    assert probs.value > TOLERANCES["fp32"].atol
    meta = read_metadata(graphs["fp16"].path if precision == "fp16" else graphs["int8"].paths["qdq"])
    assert meta["parity"]["ok"] and meta["parity"]["precision"] == precision


def test_fp16_grades_agree_with_eager_on_real_cells(graphs) -> None:
    """The decision itself, outside the checker: fp16 ONNX Runtime and eager torch grade the same cells alike."""
    from lineside.export.calibration import real_images

    images, _ = real_images(None, OnnxRuntimeBackend(graphs["fp16"].path).input_size, 1, PARITY_IMAGES, split="val")
    ort = OnnxRuntimeBackend(graphs["fp16"].path)(images)
    eager = TorchBackend(graphs["ckpt"])(images)
    same = ort["grade"] == eager["grade"]
    probs = np.sort(eager["grade_probs"], 1)
    # every disagreement is a near tie within the fp16 limit of grade_probs
    limit = _rows(graphs["fp16"].parity)["grade_probs"].limit
    assert same.mean() >= TOLERANCES["fp16"].min_agreement or ((probs[:, -1] - probs[:, -2])[~same] <= 2 * limit).all()
    assert len(np.unique(eager["grade"])) > 1, "a trained model grades real cells differently"


def test_tight_parity_tolerance_fails_the_cli_naming_the_flag(graphs, tmp_path: Path, capsys) -> None:
    args = ["--onnx", str(graphs["fp32"].path), "--out", str(tmp_path), "--formats", "qdq", "--calib-images", "32",
            "--parity-images", "16"]
    assert int8_main(args + ["--parity-tolerance", "grade_probs=1e-6"]) == 1
    err = capsys.readouterr().err
    assert "parity FAILED" in err and "grade_probs max|Δ|" in err and "> limit 1.00e-06" in err
    assert "--parity-tolerance grade_probs=" in err and "--parity-images 0" in err
    # a loose factor accepts what the tight limit refused
    assert int8_main(args + ["--parity-tolerance", "4"]) == 0, capsys.readouterr().err


def test_tensorrt_rtx_builds_an_fp16_engine_from_the_trained_graph(graphs, tmp_path: Path) -> None:
    from lineside.export.tensorrt import export_tensorrt, import_tensorrt

    if import_tensorrt("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install '.[tensorrt]'); it builds without a GPU")
    graph = graphs["fp16"].path
    r = export_tensorrt(None, graph, tmp_path, "fp16", (1, 8), flavour="tensorrt_rtx", verify=verify_artefact)
    assert r.metadata["precision"] == "fp16" and r.path.stat().st_size > 1_000_000
    assert Path(r.metadata["source_onnx"]) == graph.resolve()
    # the engine needs a GPU to run: the parity it ships with is its fp16 graph's, checked in ONNX Runtime
    assert read_metadata(graph)["parity"]["ok"] and read_metadata(graph)["parity"]["precision"] == "fp16"
    assert any("engine parity: skipped" in n for n in r.notes) or r.parity is not None
