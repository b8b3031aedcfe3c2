"""Triton Inference Server model repository: one grader served to many stations, batched on the server.

    lineside export triton --ckpt best.ckpt --out model_repository/
    lineside export triton --onnx export/quickstart/model.onnx --out model_repository/ --max-batch 32
    lineside export triton --onnx export/model.onnx --engine export/trt/model.engine --out model_repository/

writes

    model_repository/lineside_grader/config.pbtxt     # Triton's ModelConfig, written with its own protobuf
    model_repository/lineside_grader/labels.txt       # grade names (label_filename of grade_probs)
    model_repository/lineside_grader/1/model.onnx     # or model.plan with --engine
    model_repository/lineside_grader/1/metadata.json  # the artefact's metadata (load_backend works on it)

Input and output names, data types and dims come from the artefact's ``metadata.json``
(``inputs`` / ``outputs``; the batch axis ``N`` becomes ``max_batch_size``), so a new head's
outputs appear in the config without code here. ONNX graphs are served by the
``onnxruntime`` backend (GPU or CPU instances), TensorRT engines by the ``tensorrt`` backend
(GPU only; the engine must be built for the server's GPU and TensorRT version). Dynamic
batching gathers single frames from many stations into the preferred batch sizes, waiting at
most ``--max-queue-delay-us``. ``--ckpt`` exports the ONNX graph first, with its parity check.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lineside.export.metadata import MetadataError, read_metadata, write_metadata

__all__ = ["TritonExportError", "TritonRepository", "model_config_pb2", "triton_config", "write_repository", "TRITON_DTYPES"]


class TritonExportError(RuntimeError):
    """The repository cannot be written from what was given (missing file, no metadata, bad option)."""


# numpy dtype name (metadata) → Triton DataType name
TRITON_DTYPES: dict[str, str] = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16", "object": "TYPE_STRING",
}

# artefact kind → (platform, backend, file name in the version folder)
PLATFORMS: dict[str, tuple[str, str, str]] = {
    "onnx": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan"),
}

LABELS_FILE = "labels.txt"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def model_config_pb2():
    """Triton's ``model_config_pb2`` from the ``tritonclient`` package.

    ``tritonclient.grpc`` needs grpcio (the ``grpc`` extra); without it the generated module is
    loaded straight from the package's files (it needs only protobuf).
    """
    try:
        from tritonclient.grpc import model_config_pb2 as mc

        return mc
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise TritonExportError("Triton's model config protobuf is missing: pip install tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    name = "lineside_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None or not path.is_file():
        raise TritonExportError(f"{path}: Triton's model config protobuf is missing from tritonclient; reinstall tritonclient")
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _dims(spec: dict) -> tuple[list[int], bool]:
    """Dims without the batch axis (``-1`` for other dynamic axes) and whether the batch axis is there."""
    shape = list(spec["shape"])
    batched = bool(shape) and shape[0] == "N"
    rest = shape[1:] if batched else shape
    return [int(d) if isinstance(d, int) or str(d).isdigit() else -1 for d in rest], batched


def _io(message: Any, spec: dict, mc: Any, batched_model: bool) -> None:
    dtype = str(spec["dtype"])
    if dtype not in TRITON_DTYPES:
        raise TritonExportError(f"{spec['name']}: dtype {dtype!r} has no Triton type ({', '.join(TRITON_DTYPES)})")
    message.name = spec["name"]
    message.data_type = mc.DataType.Value(TRITON_DTYPES[dtype])
    dims, batched = _dims(spec)
    if batched_model and not batched:
        raise TritonExportError(f"{spec['name']}: shape {spec['shape']} has no batch axis 'N' first; Triton batches on axis 0")
    if dims:
        message.dims.extend(dims)
    else:  # a per-item scalar, (N,) in the model: Triton wants dims [1] reshaped to []
        message.dims.append(1)
        message.reshape.SetInParent()


def triton_config(
    metadata: dict,
    name: str = "lineside_grader",
    kind: str = "onnx",
    max_batch: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    device: str = "gpu",
    label_output: str | None = "grade_probs",
):
    """The ``ModelConfig`` protobuf of an artefact described by ``metadata``.

    Args:
        metadata: the artefact's metadata (``inputs``, ``outputs``, ``class_names``).
        name: model name (the folder name in the repository).
        kind: ``onnx`` or ``tensorrt``.
        max_batch: Triton's ``max_batch_size`` (largest batch the server forms).
        preferred_batch_sizes: batch sizes dynamic batching aims for (each ≤ ``max_batch``).
        max_queue_delay_us: longest a request waits for others to batch with.
        instances: model instances (per GPU for ``gpu``).
        device: ``gpu`` or ``cpu`` instances.
        label_output: output that gets ``label_filename`` (when it has one entry per class).
    """
    mc = model_config_pb2()
    if kind not in PLATFORMS:
        raise TritonExportError(f"artefact kind {kind!r}: choose from {', '.join(PLATFORMS)}")
    if device not in ("gpu", "cpu"):
        raise TritonExportError(f"instance kind {device!r}: use gpu or cpu")
    if kind == "tensorrt" and device != "gpu":
        raise TritonExportError("TensorRT engines run on GPU instances only; use --kind gpu or serve the ONNX graph")
    if not _NAME_RE.match(name):
        raise TritonExportError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    if max_batch < 1:
        raise TritonExportError(f"--max-batch {max_batch}: give at least 1")
    preferred = sorted({int(b) for b in preferred_batch_sizes})
    too_big = [b for b in preferred if b > max_batch or b < 1]
    if too_big:
        raise TritonExportError(f"preferred batch sizes {too_big} are outside 1..max batch {max_batch}")
    if max_queue_delay_us < 0 or instances < 1:
        raise TritonExportError("--max-queue-delay-us must be ≥ 0 and --instances ≥ 1")
    if not metadata.get("inputs") or not metadata.get("outputs"):
        raise TritonExportError("the metadata lists no inputs / outputs; export the artefact with `lineside export onnx`")

    platform, backend, filename = PLATFORMS[kind]
    cfg = mc.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=int(max_batch),
                         default_model_filename=filename)
    for spec in metadata["inputs"]:
        _io(cfg.input.add(), spec, mc, True)
    n_classes = len(metadata.get("class_names") or [])
    for spec in metadata["outputs"]:
        out = cfg.output.add()
        _io(out, spec, mc, True)
        if label_output and spec["name"] == label_output and n_classes and list(out.dims) == [n_classes]:
            out.label_filename = LABELS_FILE
    group = cfg.instance_group.add()
    group.kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    group.count = int(instances)
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    return cfg


def config_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """``config.pbtxt`` text → Triton's ``ModelConfig`` protobuf."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


@dataclass
class TritonRepository:
    """What :func:`write_repository` wrote."""

    root: Path
    model_dir: Path
    config_path: Path
    artefact: Path
    metadata: dict
    config: Any
    notes: list[str]


def _metadata_for(path: Path, what: str) -> dict:
    try:
        return read_metadata(path)
    except MetadataError as exc:
        raise TritonExportError(f"{what} {path}: {exc}") from exc


def _check_onnx_graph(path: Path, metadata: dict) -> None:
    """The graph has every input and output the metadata names (a stale metadata.json is caught here)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
        raise TritonExportError(f"--onnx {path}: not a readable ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from exc
    graph_in = {i.name for i in model.graph.input}
    graph_out = {o.name for o in model.graph.output}
    missing = [s["name"] for s in metadata["inputs"] if s["name"] not in graph_in]
    missing += [s["name"] for s in metadata["outputs"] if s["name"] not in graph_out]
    if missing:
        raise TritonExportError(f"--onnx {path}: metadata names {missing} that the graph lacks (graph inputs {sorted(graph_in)}, outputs {sorted(graph_out)})")


def write_repository(
    out: str | os.PathLike,
    onnx: str | os.PathLike | None = None,
    engine: str | os.PathLike | None = None,
    name: str = "lineside_grader",
    version: int = 1,
    max_batch: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    device: str = "gpu",
) -> TritonRepository:
    """Write ``out/<name>/`` (config.pbtxt, labels.txt, ``<version>/model.onnx|model.plan``, metadata.json).

    With ``engine`` the TensorRT engine is served (its own metadata if it has one, else that of
    ``onnx``, the graph it was built from); otherwise the ONNX graph ``onnx``.
    """
    notes: list[str] = []
    onnx_path = Path(onnx) if onnx else None
    engine_path = Path(engine) if engine else None
    if onnx_path is None and engine_path is None:
        raise TritonExportError("give --ckpt, --onnx or --engine")
    if onnx_path is not None and not onnx_path.is_file():
        raise TritonExportError(f"--onnx {onnx_path}: file not found")
    if engine_path is not None and not engine_path.is_file():
        raise TritonExportError(f"--engine {engine_path}: file not found")
    if version < 1:
        raise TritonExportError(f"--version {version}: Triton versions are positive integers")

    if engine_path is not None:
        kind, source = "tensorrt", engine_path
        try:
            meta = read_metadata(engine_path, required=False)
        except MetadataError:
            meta = {}
        if not meta or meta.get("format") not in ("tensorrt", "engine", "trt"):
            if onnx_path is None:
                raise TritonExportError(f"--engine {engine_path}: no metadata beside it; give --onnx with the graph it was built from")
            meta = _metadata_for(onnx_path, "--onnx")
            notes.append(f"inputs/outputs from {onnx_path}'s metadata (the engine has none of its own)")
        if meta.get("format") == "tensorrt":  # the engine's own metadata: its profile bounds the batch
            profile_max = (meta.get("batch_profile") or {}).get("max") or max(meta.get("batch_sizes") or [0]) or None
            if profile_max and max_batch > int(profile_max):
                notes.append(f"max batch {max_batch} → {profile_max}: the engine's optimisation profile ends there")
                max_batch = int(profile_max)
                preferred_batch_sizes = [b for b in preferred_batch_sizes if b <= max_batch] or [max_batch]
            if (meta.get("tensorrt") or {}).get("flavour") == "tensorrt_rtx":
                notes.append("this is a TensorRT-RTX engine; Triton's tensorrt backend loads engines of full TensorRT "
                             "(build one with the tensorrt flavour for the server's GPU)")
    else:
        kind, source = "onnx", onnx_path
        meta = _metadata_for(onnx_path, "--onnx")
        _check_onnx_graph(onnx_path, meta)

    cfg = triton_config(meta, name, kind, max_batch, preferred_batch_sizes, max_queue_delay_us, instances, device)
    model_dir = Path(out) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    for _, _, stale in PLATFORMS.values():  # one model file per version folder
        (version_dir / stale).unlink(missing_ok=True)
    target = version_dir / PLATFORMS[kind][2]
    shutil.copyfile(source, target)
    class_names = list(meta.get("class_names") or [])
    labels = model_dir / LABELS_FILE
    if class_names:
        labels.write_text("\n".join(class_names) + "\n", encoding="utf-8")
    if kind == "tensorrt" and meta.get("format") != "tensorrt":  # the graph's metadata, describing the engine
        meta = {k: v for k, v in meta.items() if k not in ("parity", "artefact", "artefact_sha256")}
        meta.update(format="tensorrt", metadata_from=os.path.abspath(onnx_path))
    meta = dict(meta, source_artefact=os.path.abspath(source),
                triton={"name": name, "version": version, "platform": cfg.platform, "max_batch_size": cfg.max_batch_size,
                        "preferred_batch_sizes": list(cfg.dynamic_batching.preferred_batch_size),
                        "max_queue_delay_microseconds": cfg.dynamic_batching.max_queue_delay_microseconds,
                        "instance_kind": device, "instances": instances})
    write_metadata(meta, target)
    text = config_text(cfg)
    config_path = model_dir / "config.pbtxt"
    tmp = config_path.with_name("config.pbtxt.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config_path)
    return TritonRepository(Path(out), model_dir, config_path, target, meta, cfg, notes)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TritonExportError(f"{what} {text!r}: give integers, e.g. 8,16,32") from None
    if not vals:
        raise TritonExportError(f"{what} {text!r}: give at least one")
    return vals
