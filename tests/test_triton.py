"""Triton model repository: config.pbtxt parsed back into Triton's own ModelConfig and checked against the ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format

from lineside.cli.export import triton_main as main
from lineside.export.triton import model_config_pb2, write_repository

CKPT = Path(__file__).parent / "data" / "pre_namespace_tiny.ckpt"

# ONNX TensorProto elem type → Triton DataType name
ONNX_TO_TRITON = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from lineside.export.onnx_export import export_onnx

    return export_onnx(CKPT, tmp_path_factory.mktemp("onnx"), parity_images=0).path


def _parse(path: Path):
    mc = model_config_pb2()
    return text_format.Parse(path.read_text(), mc.ModelConfig()), mc


def _graph_dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_onnx_repository_matches_graph(onnx_model, tmp_path):
    rc = main(["--onnx", str(onnx_model), "--out", str(tmp_path / "repo"), "--max-batch", "16",
               "--preferred-batch-sizes", "4,16", "--max-queue-delay-us", "500", "--instances", "2"])
    assert rc == 0
    model_dir = tmp_path / "repo" / "lineside_grader"
    assert (model_dir / "1" / "model.onnx").is_file() and not (model_dir / "1" / "model.plan").exists()
    cfg, mc = _parse(model_dir / "config.pbtxt")
    assert cfg.name == "lineside_grader"
    assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 16
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU

    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    for tensors, graph_tensors in ((cfg.input, graph.input), (cfg.output, graph.output)):
        by_name = {t.name: t for t in graph_tensors}
        assert {t.name for t in tensors} == set(by_name)
        for t in tensors:
            g = by_name[t.name]
            assert mc.DataType.Name(t.data_type) == ONNX_TO_TRITON[g.type.tensor_type.elem_type]
            dims = _graph_dims(g)
            assert dims[0] == "N"  # the batch axis, left to max_batch_size
            if dims[1:]:
                assert list(t.dims) == dims[1:]
            else:  # (N,) in the graph: dims [1] reshaped to a scalar per item
                assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []

    probs = next(o for o in cfg.output if o.name == "grade_probs")
    labels = (model_dir / probs.label_filename).read_text().splitlines()
    meta = json.loads((model_dir / "1" / "metadata.json").read_text())
    assert labels == meta["class_names"] and len(labels) == 4
    assert meta["artefact"] == "model.onnx" and meta["triton"]["max_batch_size"] == 16


def test_repository_model_loads_with_backend(onnx_model, tmp_path):
    import numpy as np

    from lineside.runtime import load_backend

    repo = write_repository(tmp_path, onnx_model, device="cpu")
    assert repo.config.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_CPU
    out = load_backend(repo.artefact)(np.zeros((3, 1, 64, 64), np.uint8))
    assert out["grade_probs"].shape == (3, 4)


def test_engine_gives_tensorrt_plan(onnx_model, tmp_path):
    engine = tmp_path / "fake.engine"
    engine.write_bytes(b"not really an engine")
    repo_dir = tmp_path / "repo"
    write_repository(repo_dir, onnx_model)  # an ONNX version first: the engine replaces it
    assert main(["--onnx", str(onnx_model), "--engine", str(engine), "--out", str(repo_dir), "--name", "grader_trt"]) == 0
    write_repository(repo_dir, onnx_model, engine, name="lineside_grader")
    for name in ("grader_trt", "lineside_grader"):
        model_dir = repo_dir / name
        cfg, _ = _parse(model_dir / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "tensorrt_plan" and cfg.backend == "tensorrt"
        assert cfg.default_model_filename == "model.plan"
        assert (model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
        assert not (model_dir / "1" / "model.onnx").exists()
        meta = json.loads((model_dir / "1" / "metadata.json").read_text())
        assert meta["artefact"] == "model.plan" and meta["format"] == "tensorrt" and "parity" not in meta
        assert [o.name for o in cfg.output] == ["grade_probs", "grade", "grade_heatmap"]


def test_engine_needs_gpu_instances(onnx_model, tmp_path, capsys):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    assert main(["--onnx", str(onnx_model), "--engine", str(engine), "--out", str(tmp_path / "r"), "--kind", "cpu"]) == 1
    assert "GPU instances only" in capsys.readouterr().err


def test_bad_onnx_path_is_a_clear_error(tmp_path, capsys):
    assert main(["--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err
    assert "missing.onnx" in err and "not found" in err
    assert not (tmp_path / "repo").exists()


def test_onnx_without_metadata_is_a_clear_error(onnx_model, tmp_path, capsys):
    lone = tmp_path / "lone" / "model.onnx"
    lone.parent.mkdir()
    lone.write_bytes(onnx_model.read_bytes())
    assert main(["--onnx", str(lone), "--out", str(tmp_path / "repo")]) == 1
    assert "no metadata" in capsys.readouterr().err


def test_preferred_batch_sizes_are_checked(onnx_model, tmp_path, capsys):
    assert main(["--onnx", str(onnx_model), "--out", str(tmp_path / "r"), "--max-batch", "8", "--preferred-batch-sizes", "4,16"]) == 1
    assert "outside 1..max batch 8" in capsys.readouterr().err
    # the default targets stop at --max-batch
    assert main(["--onnx", str(onnx_model), "--out", str(tmp_path / "r"), "--max-batch", "12"]) == 0
    cfg, _ = _parse(tmp_path / "r" / "lineside_grader" / "config.pbtxt")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]


def test_from_checkpoint(tmp_path):
    assert main(["--ckpt", str(CKPT), "--out", str(tmp_path / "repo"), "--parity-images", "4"]) == 0
    cfg, _ = _parse(tmp_path / "repo" / "lineside_grader" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and [i.name for i in cfg.input] == ["image"]
    assert (tmp_path / "repo" / "lineside_grader" / "1" / "model.onnx").is_file()


def test_engine_metadata_bounds_the_batch(onnx_model, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    meta = json.loads((onnx_model.parent / "metadata.json").read_text())
    meta.update(format="tensorrt", artefact="model.engine", batch_sizes=[1, 8], batch_profile={"min": 1, "opt": 4, "max": 8})
    (tmp_path / "model.engine.json").write_text(json.dumps(meta))
    repo = write_repository(tmp_path / "repo", engine=engine, max_batch=32, preferred_batch_sizes=(8, 16, 32))
    assert repo.config.max_batch_size == 8 and list(repo.config.dynamic_batching.preferred_batch_size) == [8]
    assert repo.config.platform == "tensorrt_plan" and any("profile" in n for n in repo.notes)
