"""TensorRT engines: TensorRT's own ONNX parser and builder (TensorRT-RTX, ahead of time on the CPU) take the
fp32, fp16 and INT8 Q/DQ graphs of the tiny checkpoint; the runner refuses foreign engines before deserialising."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lineside.export import tensorrt as trt_export
from lineside.runtime import BackendError, load_backend
from lineside.export.metadata import read_metadata, write_metadata
from lineside.export.onnx_export import export_onnx
from lineside.export.quantize import quantize_onnx
from lineside.cli.export import tensorrt_main as main
from lineside.runtime.tensorrt_backend import TensorRTBackend
from lineside.export.tensorrt import (
    TensorRTError,
    batch_profile,
    build_engine,
    engine_problems,
    import_tensorrt,
    parse_gpu_arch,
)

TINY = Path(__file__).parent / "data" / "pre_namespace_tiny.ckpt"


@pytest.fixture(scope="module")
def builder_flavour() -> str:
    for flavour in ("tensorrt_rtx", "tensorrt"):
        if import_tensorrt(flavour) is not None and (flavour == "tensorrt_rtx" or torch.cuda.is_available()):
            return flavour
    message = "no TensorRT builder here: pip install '.[tensorrt]' (TensorRT-RTX builds without a GPU)"
    if os.environ.get("CI"):
        pytest.fail(message + " — CI installs the tensorrt extra, so this is a broken install")
    pytest.skip(message)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint's fp32, fp16 and INT8 Q/DQ ONNX graphs."""
    root = tmp_path_factory.mktemp("graphs")
    fp32 = export_onnx(TINY, root / "fp32", parity_images=0).path
    fp16 = export_onnx(TINY, root / "fp16", fp16=True, parity_images=0).path
    qdq = quantize_onnx(fp32, calib_images=32, parity_images=0, formats=("qdq",)).paths["qdq"]
    return {"fp32": fp32, "fp16": fp16, "int8": qdq, "qoperator_src": fp32}


@pytest.fixture(scope="module")
def engines(graphs, builder_flavour, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("engines")
    return {p: build_engine(graphs[p], root / p, p, (1, 8, 32), flavour=builder_flavour) for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_parses_and_builds_every_precision(engines, precision: str) -> None:
    r = engines[precision]
    assert r.path.name == "model.engine" and r.path.stat().st_size > 10_000
    assert r.layers and r.layers > 50


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_metadata(engines, graphs, builder_flavour, precision: str) -> None:
    r = engines[precision]
    meta = read_metadata(r.path.parent)  # the folder's metadata.json describes the engine
    assert meta == read_metadata(r.path)
    assert meta["format"] == "tensorrt" and meta["artefact"] == "model.engine" and meta["precision"] == precision
    assert meta["batch_profile"] == {"min": 1, "opt": 8, "max": 32} and meta["batch_sizes"] == [1, 8, 32]
    assert meta["max_batch_enforced"] is True
    info = meta["tensorrt"]
    mod = import_tensorrt(builder_flavour)
    assert info["flavour"] == builder_flavour and info["version"] == mod.__version__
    assert info["compute_capabilities"] and all(float(c) >= 7.5 for c in info["compute_capabilities"])
    assert info["strongly_typed"] is True
    if builder_flavour == "tensorrt_rtx" and not torch.cuda.is_available():
        assert info["ahead_of_time"] is True and info["built_on_gpu"] is None
    assert meta["source_onnx"] == os.path.abspath(graphs[precision])
    assert meta["inputs"][0]["shape"] == ["N", 1, 64, 64] and meta["inputs"][0]["dtype"] == "uint8"
    assert [o["name"] for o in meta["outputs"]] == ["grade_probs", "grade", "grade_heatmap"]
    assert meta["class_names"] and meta["preprocessing"]["input_size"] == [64, 64]
    if precision == "int8":
        assert meta["quantization"]["format"] == "QDQ"


def test_rtx_targets_named_architectures(graphs, builder_flavour, tmp_path: Path) -> None:
    if builder_flavour != "tensorrt_rtx":
        pytest.skip("ahead-of-time targets are a TensorRT-RTX feature")
    r = build_engine(graphs["fp16"], tmp_path, "fp16", (1, 4), flavour="tensorrt_rtx", gpu_arch="sm86,8.9")
    assert r.metadata["tensorrt"]["compute_capabilities"] == ["8.6", "8.9"]
    assert r.metadata["batch_profile"] == {"min": 1, "opt": 4, "max": 4}
    with pytest.raises(TensorRTError, match="cannot target compute capability 9.9"):
        build_engine(graphs["fp16"], tmp_path / "x", "fp16", flavour="tensorrt_rtx", gpu_arch="9.9")


def test_rtx_on_a_gpu_it_cannot_target_builds_ahead_of_time(graphs, builder_flavour, monkeypatch, tmp_path: Path) -> None:
    if builder_flavour != "tensorrt_rtx":
        pytest.skip("ahead-of-time targets are a TensorRT-RTX feature")
    monkeypatch.setattr(trt_export, "_cuda_available", lambda: True)
    monkeypatch.setattr(trt_export, "_device_capability", lambda device="cuda": (9, 0))
    monkeypatch.setattr(trt_export, "_device_name", lambda device="cuda": "NVIDIA H200")
    r = build_engine(graphs["fp32"], tmp_path, "fp32", (1, 8), flavour="tensorrt_rtx")
    info = r.metadata["tensorrt"]
    assert info["ahead_of_time"] is True and "9.0" not in info["compute_capabilities"] and "8.6" in info["compute_capabilities"]
    with pytest.raises(TensorRTError, match=r"NVIDIA H200, compute capability 9\.0\) is not a TensorRT-RTX target"):
        build_engine(graphs["fp32"], tmp_path / "x", "fp32", flavour="tensorrt_rtx", gpu_arch="current")


def test_strongly_typed_precision_comes_from_the_graph(graphs, builder_flavour, tmp_path: Path) -> None:
    with pytest.raises(TensorRTError, match="is an fp32 graph, not fp16.*--fp16"):
        build_engine(graphs["fp32"], tmp_path, "fp16", flavour=builder_flavour)
    with pytest.raises(TensorRTError, match="is an fp16 graph, not int8"):
        build_engine(graphs["fp16"], tmp_path, "int8", flavour=builder_flavour)
    qop = quantize_onnx(graphs["fp32"], tmp_path / "qop", calib_images=8, parity_images=0, formats=("qoperator",)).paths["qoperator"]
    with pytest.raises(TensorRTError, match="QOperator INT8 graph.*model.qdq.onnx"):
        build_engine(qop, tmp_path, "int8", flavour=builder_flavour)


def test_cli_builds_from_onnx_beside_it(graphs, builder_flavour, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "export"
    shutil.copytree(graphs["fp32"].parent, folder)
    rc = main(["--onnx", str(folder / "model.onnx"), "--out", str(folder), "--precision", "fp32", "--batch-sizes", "1,4,16,64",
               "--flavour", builder_flavour])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "built " in text and "MB, fp32" in text and "network layers:" in text and "min 1, opt 16, max 64" in text
    # the ONNX graph keeps the folder's metadata.json; the engine gets its own
    assert read_metadata(folder)["artefact"] == "model.onnx"
    assert read_metadata(folder / "model.engine")["format"] == "tensorrt"
    assert (folder / "model.engine.json").is_file()


def test_batch_profile_and_arch_parsing() -> None:
    assert batch_profile([1, 8, 32]) == {"min": 1, "opt": 8, "max": 32}
    assert batch_profile([32, 8]) == {"min": 1, "opt": 32, "max": 32}
    assert batch_profile([1, 4, 8, 32], opt=4) == {"min": 1, "opt": 4, "max": 32}
    with pytest.raises(ValueError):
        batch_profile([1, 8], opt=9)
    assert parse_gpu_arch("sm86, 8.9,120,sm_75") == ["8.6", "8.9", "12.0", "7.5"]
    assert parse_gpu_arch("current") == ["current"] and parse_gpu_arch(None) is None


# -- the runner ------------------------------------------------------------------------------------
def _fake_engine(engine_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of an engine with its metadata edited (``tensorrt`` keys)."""
    dst = tmp_path / "fake"
    dst.mkdir()
    shutil.copy(engine_dir / "model.engine", dst / "model.engine")
    meta = json.loads((engine_dir / "metadata.json").read_text())
    meta["tensorrt"].update(changes)
    write_metadata(meta, dst / "model.engine")
    return dst / "model.engine"


def test_refuses_an_engine_of_another_tensorrt_version(engines, builder_flavour, tmp_path: Path) -> None:
    path = _fake_engine(engines["fp16"].path.parent, tmp_path, version="0.9.0.1")
    with pytest.raises(BackendError, match=r"refused: it was built with TensorRT(-RTX)? 0\.9\.0\.1, this machine runs .* an engine runs only "
                                            r"on the TensorRT flavour and version that built it"):
        TensorRTBackend(path)
    with pytest.raises(BackendError, match="refused"):
        load_backend(path.parent)


def test_refuses_an_engine_of_another_flavour(engines, builder_flavour, tmp_path: Path) -> None:
    other = "tensorrt" if builder_flavour == "tensorrt_rtx" else "tensorrt_rtx"
    path = _fake_engine(engines["fp32"].path.parent, tmp_path, flavour=other, version="10.13.0.35")
    name = "TensorRT 10.13.0.35" if other == "tensorrt" else "TensorRT-RTX 10.13.0.35"
    with pytest.raises(BackendError, match=f"refused: it was built with {name}"):
        TensorRTBackend(path)


def test_refuses_an_engine_for_another_gpu_before_deserialising(engines, monkeypatch, tmp_path: Path) -> None:
    path = _fake_engine(engines["int8"].path.parent, tmp_path, compute_capabilities=["12.0"], hardware_compatibility="none")
    monkeypatch.setattr(trt_export, "_cuda_available", lambda: True)
    monkeypatch.setattr(trt_export, "_device_capability", lambda device="cuda": (8, 6))
    monkeypatch.setattr(trt_export, "_device_name", lambda device="cuda": "NVIDIA RTX A6000")

    def no_load(self):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the engine was deserialised before the GPU check")

    monkeypatch.setattr(TensorRTBackend, "_load", no_load)
    with pytest.raises(BackendError, match=r"refused: it was built for GPU compute capability 12\.0, this GPU is NVIDIA RTX A6000 \(8\.6\); "
                                            r"rebuild it for this GPU"):
        TensorRTBackend(path)


def test_engine_problems_table() -> None:
    meta = {"format": "tensorrt", "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": ["8.6", "8.9"]}}
    assert engine_problems(meta, "tensorrt_rtx", "1.7.1.116", (8, 9)) == []
    assert engine_problems(meta, "tensorrt_rtx", "1.7.1", (8, 6)) == []
    assert "version that built it" in engine_problems(meta, "tensorrt_rtx", "1.8.0.1", (8, 6))[0]
    assert "no TensorRT-RTX runtime is installed" in engine_problems(meta, None, None)[0]
    assert "this GPU is 9.0" in engine_problems(meta, "tensorrt_rtx", "1.7.1.116", (9, 0))[0]
    full = {"format": "tensorrt", "tensorrt": {"flavour": "tensorrt", "version": "10.13.0.35", "compute_capabilities": ["8.6"],
                                               "hardware_compatibility": "ampere_plus"}}
    assert engine_problems(full, "tensorrt", "10.13.0.35", (9, 0)) == []
    assert "Ampere or newer" in engine_problems(full, "tensorrt", "10.13.0.35", (7, 5))[0]
    assert "no TensorRT build record" in engine_problems({"format": "onnx"}, "tensorrt", "10.13.0.35")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_running_without_a_gpu_says_so(engines) -> None:
    with pytest.raises(BackendError, match="needs an NVIDIA GPU"):
        TensorRTBackend(engines["fp16"].path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_runs_on_the_gpu(engines, graphs, precision: str) -> None:
    from lineside.runtime import OnnxRuntimeBackend
    from lineside.export.calibration import real_images
    from lineside.export.parity import check_parity

    try:
        backend = TensorRTBackend(engines[precision].path)
    except BackendError as exc:
        if "refused" in str(exc):
            pytest.skip(f"this GPU is not among the engine's targets: {exc}")
        raise
    images, _ = real_images(None, (64, 64), 1, 40, split="val")
    out = backend(images)
    assert out["grade_probs"].shape == (40, 4) and out["grade"].dtype == np.int64
    report = check_parity(OnnxRuntimeBackend(graphs["fp32"]), backend, images, precision, batch_size=13)
    assert report.ok, report.table()
    assert backend(np.concatenate([images] * 2))["grade"].shape == (80,)  # past the profile's max: split


@pytest.mark.slow
def test_quickstart_sized_model_fp16_and_int8(builder_flavour, tmp_path: Path) -> None:
    """EfficientNet-Lite0 at 160 px (the quickstart model, ImageNet-initialised): the fp16 graph loads in
    ONNX Runtime on the CPU (its NCHWc pass used to crash on it) and TensorRT builds fp16 and INT8 engines."""
    import yaml

    from lineside.runtime import OnnxRuntimeBackend
    from lineside.export.calibration import real_images
    from lineside.export.checkpoint import LoadedModel, instantiate_config
    from lineside.vision.elpv import ELPV_GRADE_NAMES

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").read_text())
    model = instantiate_config(cfg["model"]["model"], offline_weights=False).eval()
    loaded = LoadedModel(model, list(ELPV_GRADE_NAMES), 160, 1, 1)
    fp16 = export_onnx(loaded, tmp_path / "fp16", fp16=True, parity_images=0).path
    fp32 = export_onnx(loaded, tmp_path / "fp32", parity_images=0).path
    images, _ = real_images(None, (160, 160), 1, 8, split="val")
    a, b = OnnxRuntimeBackend(fp32)(images)["grade_probs"], OnnxRuntimeBackend(fp16)(images)["grade_probs"]
    assert np.abs(a - b).max() < 1e-2
    qdq = quantize_onnx(fp32, calib_images=32, parity_images=0, formats=("qdq",)).paths["qdq"]
    for precision, graph in (("fp16", fp16), ("int8", qdq)):
        r = build_engine(graph, tmp_path / f"trt_{precision}", precision, (1, 8, 32), flavour=builder_flavour)
        assert r.metadata["precision"] == precision and r.path.stat().st_size > 1_000_000


def test_parity_gate_notes_accepted_floats_and_stops_naming_the_flag() -> None:
    from lineside.export.parity import ParityReport, ParityRow

    # above the fp16 limit, within its slack, every grade the same: built, with a note
    held = ParityReport("torch", "onnxruntime-fp16", 32, [ParityRow("grade_probs", "float", "max|Δ|", 2e-2, 1.5e-2, True),
                                                          ParityRow("grade", "decoded", "agreement", 1.0, 0.98, True)], precision="fp16")
    notes: list[str] = []
    trt_export._gate(held, "the fp16 ONNX graph", notes)
    assert len(notes) == 2 and "PASS" in notes[0] and "grade_probs max|Δ| 2.00e-02 above its fp16 limit 1.50e-02" in notes[1]
    broken = ParityReport("torch", "onnxruntime-fp16", 32, [ParityRow("grade_probs", "float", "max|Δ|", 0.5, 1e-2, False),
                                                            ParityRow("grade", "decoded", "agreement", 1.0, 0.98, True)], precision="fp16")
    with pytest.raises(TensorRTError, match=r"failed its parity check: grade_probs max\|Δ\| 5\.00e-01 > limit 1\.00e-02.*"
                                            r"--parity-tolerance grade_probs=0\.63.*--parity-images 0"):
        trt_export._gate(broken, "the fp16 ONNX graph", [])
    flips = ParityReport("torch", "onnxruntime-fp16", 32, [ParityRow("grade", "decoded", "agreement", 0.9, 0.98, False)], precision="fp16")
    with pytest.raises(TensorRTError, match=r"grade agreement 90\.00% < 98%.*--parity-tolerance grade=0\.9 "):
        trt_export._gate(flips, "the fp16 ONNX graph", [])


def test_rtx_builds_the_multi_head_engine(builder_flavour, tmp_path: Path) -> None:
    """Grading + localization in one graph (grade, grade heatmap, top-K boxes, defect heatmap): TensorRT's
    parser and builder take every decoder (TensorRT-RTX ahead of time on the CPU)."""
    from test_box_outputs import loaded

    graph = export_onnx(loaded(), tmp_path / "onnx", parity_images=0).path
    r = build_engine(graph, tmp_path / "trt", "fp32", (1, 4, 8), flavour=builder_flavour)
    names = ["grade_probs", "grade", "grade_heatmap", "boxes", "box_scores", "box_labels", "defect_heatmap"]
    assert [o["name"] for o in r.metadata["outputs"]] == names
    assert {o["name"]: o["kind"] for o in r.metadata["outputs"]}["boxes"] == "box"
    assert r.metadata["box_class_names"] == ["crazing", "inclusion", "patches"] and r.path.stat().st_size > 0


def test_rtx_builds_the_el_dual_engine(builder_flavour, tmp_path: Path) -> None:
    """The EL dual model (grading + dense segmentation, one image encoder) in one graph: grade, grade
    probabilities, grade heatmap, per-class defect masks and the defect heatmap; TensorRT's parser and
    builder take the segmentation decoder too (TensorRT-RTX ahead of time on the CPU), and the metadata
    records the mask classes and stride the records need for crack boxes."""
    from lineside.export.checkpoint import LoadedModel
    from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
    from lineside.fusion.segmentation_head import SegmentationHead
    from lineside.vision import ImageEncoder

    torch.manual_seed(0)
    enc = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False, dense_levels=[1, 2, 3])
    model = InspectionModel(enc, FusionTransformer(32, 1, 2, dropout=0.0), GradingHead(32, 4),
                            heads={"segmentation": SegmentationHead(32, enc.map_channels, 4, decoder_dim=16)}).eval()
    loaded = LoadedModel(model, ["ok", "mild", "moderate", "severe"], 64, 1, tasks=["grading", "segmentation"])
    graph = export_onnx(loaded, tmp_path / "onnx", parity_images=0).path
    r = build_engine(graph, tmp_path / "trt", "fp32", (1, 4, 8), flavour=builder_flavour)
    names = ["grade_probs", "grade", "grade_heatmap", "defect_masks", "defect_heatmap"]
    assert [o["name"] for o in r.metadata["outputs"]] == names
    assert r.metadata["masks"]["defect_masks"]["class_names"] == ["dark_area", "crossing", "crack", "busbar"]
    assert r.metadata["masks"]["defect_masks"]["stride"] in (2, 4)
    assert r.metadata["task"] == "grading+segmentation" and r.path.stat().st_size > 10_000 and r.layers and r.layers > 50
