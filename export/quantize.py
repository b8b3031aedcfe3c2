"""INT8 ONNX graphs calibrated on real images: Q/DQ for TensorRT, QOperator for ONNX Runtime on the CPU.

    lineside export int8 --ckpt runs/quickstart/checkpoints/best.ckpt --out export/int8
    lineside export int8 --onnx export/quickstart/model.onnx --out export/quickstart --calib my_cells/
    lineside export tensorrt --ckpt best.ckpt --out export/trt --precision int8   # builds from the Q/DQ graph

From one fp32 graph (``model.onnx``, exported first when ``--ckpt`` is given) two INT8 graphs
are written beside it, each with its own metadata file (``X.onnx.json``), so
``load_backend(path)`` / ``OnnxRuntimeBackend(path)`` read ``precision: int8``:

``model.qdq.onnx`` (for TensorRT)
    explicit ``QuantizeLinear``/``DequantizeLinear`` pairs, INT8 symmetric activations (zero
    point 0, the only kind TensorRT takes), INT8 symmetric per-channel weights, biases left in
    float (TensorRT's ONNX parser rejects int32-quantized biases). TensorRT 10/11 and
    TensorRT-RTX build strongly typed INT8 engines from it without calibrator classes.
``model.qoperator.onnx`` (for ONNX Runtime on the CPU)
    ``QLinearConv`` / ``QLinearMatMul`` / ``QGemm`` … with UINT8 activations and INT8 per-channel
    weights: integer kernels, about a quarter of the size. (The Q/DQ graph also runs in ONNX
    Runtime, but mostly through float kernels; it is for TensorRT.)

Calibration reads REAL images: ``--calib DIR`` (a folder / glob / CSV of your own frames), by
default ELPV cells of the *train* module blocks from the installed package (never the test
blocks). Only the network between the first convolution and the last MatMul/Gemm is quantized:
the uint8 ``image`` input, the in-graph resize and normalisation before it, and the softmax /
test-time-view averaging / argmax decoders after it stay float and exact. Every graph is then
checked against the eager model (or the fp32 graph when no checkpoint is at hand) on real
images of the *val* blocks with the int8 tolerance of :mod:`export.parity` (decisions first, floats
at limits derived from INT8's unit roundoff; ``tolerance=`` / ``--parity-tolerance`` overrides them).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "INT8_FORMATS",
    "Int8Result",
    "QuantizeError",
    "float_ends",
    "float_inside",
    "graph_precision",
    "quantize_onnx",
    "export_int8",
]

log = logging.getLogger("lineside.export")

# format → (file name, target, op types quantized)
# Clip/Relu: a Conv's ReLU6 range becomes its output's quantization range (without them the Q/DQ
# graph's error triples); Add (QOperator only): the backbone's residual adds run as QLinearAdd.
INT8_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "qdq": ("model.qdq.onnx", "tensorrt", ("Conv", "MatMul", "Gemm", "Clip", "Relu")),
    "qoperator": ("model.qoperator.onnx", "onnxruntime-cpu", ("Conv", "MatMul", "Gemm", "Add", "Clip", "Relu")),
}
FLOAT_CONVS = 3  # the first convolutions (stem + first block, full resolution) stay float by default
ANCHOR_OPS = ("Conv", "MatMul", "Gemm")
_QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "MatMulInteger", "ConvInteger"}


class QuantizeError(RuntimeError):
    """An INT8 graph could not be made (no fp32 graph, no calibration images, quantizer failure)."""


@dataclass
class Int8Result:
    """What :func:`quantize_onnx` wrote: ``paths[fmt]``, ``metadata[fmt]``, ``parity[fmt]``."""

    source: Path
    paths: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, dict] = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.parity.values())


def graph_precision(model) -> str:
    """``fp32`` | ``fp16`` | ``int8`` (Q/DQ) | ``int8-qoperator`` of an ONNX model (ModelProto or path), read off the graph."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    if any(op in _QOPERATOR_OPS for op in ops):
        return "int8-qoperator"
    if ops.get("QuantizeLinear") or ops.get("DequantizeLinear"):
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == half for v in model.graph.value_info
    ) or any(a.t.data_type == half for n in model.graph.node if n.op_type == "Constant" for a in n.attribute):
        return "fp16"
    return "fp32"


def _name_nodes(model) -> None:
    """Give every node a unique name (the quantizer addresses nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_{node.name or 'unnamed'}"
        seen.add(node.name)


def float_ends(model, anchors: Sequence[str] = ANCHOR_OPS) -> tuple[list[str], list[str]]:
    """Names of the nodes to keep in float: ``(before, after)`` the quantizable body.

    The body is every node downstream of a convolution (the image path starts there) that is
    also upstream of (or is) a Conv/MatMul/Gemm. ``before`` holds the input cast, resize,
    normalisation and test-time flips (and constant-only side branches such as positional
    embeddings); ``after`` the softmax, view averaging and argmax decoders. A graph without
    convolutions starts its body at its first MatMul/Gemm.
    """
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    anchor_idx = [i for i, n in enumerate(nodes) if n.op_type in anchors]
    if not anchor_idx:
        return [n.name for n in nodes], []
    starts = [i for i in anchor_idx if nodes[i].op_type == "Conv"] or anchor_idx[:1]

    def walk(seed: list[int], step) -> set[int]:
        seen, stack = set(seed), list(seed)
        while stack:
            for j in step(stack.pop()):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    down = walk(starts, lambda i: [c for o in nodes[i].output for c in consumers.get(o, [])])
    up = walk(anchor_idx, lambda i: [producer[t] for t in nodes[i].input if t in producer])
    before = [n.name for i, n in enumerate(nodes) if i not in down]
    after = [n.name for i, n in enumerate(nodes) if i in down and i not in up]
    return before, after


def float_inside(model, float_convs: int = FLOAT_CONVS) -> tuple[list[str], list[str]]:
    """Names of nodes inside the body that stay float too: ``(first convolutions, head elementwise)``.

    The first ``float_convs`` convolutions (the stem and first block, at full resolution; on
    the quickstart EfficientNet-Lite0 they carry half of the INT8 error for a few percent of
    the compute) and the Add/Mul nodes after the last convolution (transformer / head bias
    and residual adds: ONNX Runtime's broadcasting QLinearAdd is slower than float there).
    """
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    first = [nodes[i].name for i in convs[: max(0, int(float_convs))]]
    head = [n.name for i, n in enumerate(nodes) if convs and i > convs[-1] and n.op_type in ("Add", "Mul")]
    return first, head


class _Frames:
    """ONNX Runtime calibration reader over uint8 frames, in batches."""

    def __init__(self, images: np.ndarray, input_name: str = "image", batch: int = 16) -> None:
        self.batches = [{input_name: np.ascontiguousarray(images[i : i + batch])} for i in range(0, len(images), batch)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


def _preprocess(src: Path, dst: Path) -> tuple[Path, str]:
    """ONNX Runtime's ``quant_pre_process`` (shape inference + basic fusions); the graph as is when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for kwargs, note in (({}, "quant_pre_process"), ({"skip_symbolic_shape": True}, "quant_pre_process (onnx shape inference only)")):
        try:
            quant_pre_process(str(src), str(dst), **kwargs)
            return dst, note
        except Exception as exc:  # noqa: BLE001 - the pre-pass is an optimisation, not a requirement
            log.info("quant_pre_process %s failed: %s", kwargs or "", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return src, "none (quant_pre_process failed)"


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise QuantizeError(f"calibration method {name!r}: choose from {', '.join(table)}")
    return table[name]


def _int32_bias_inputs(model) -> list[str]:
    """DequantizeLinear nodes fed by int32 initializers (quantized biases TensorRT rejects)."""
    import onnx

    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in int32]


def parity_reference(meta: dict, loaded=None, fp32_path: Path | None = None, trust_checkpoint: bool = False):
    """What a reduced-precision artefact is checked against: eager torch on the source checkpoint
    when it is at hand, else the fp32 graph it was made from (:class:`export.parity.ParityReference`).
    ``trust_checkpoint``: see :func:`export.checkpoint.load_inspection_model`."""
    from lineside.export.parity import ParityReference

    ckpt = meta.get("source_checkpoint")
    if loaded is not None or (ckpt and os.path.isfile(ckpt)):
        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.deployable import build_deployable

        loaded = loaded or load_inspection_model(ckpt, trust_checkpoint=trust_checkpoint)
        pre = meta.get("preprocessing") or {}
        size = tuple(pre["input_size"]) if pre.get("input_size") else None
        deployable = build_deployable(loaded, size, pre.get("tta_views"))
        return ParityReference(deployable, loaded)
    if fp32_path is None:
        raise QuantizeError("no reference for the parity check: neither the source checkpoint nor the fp32 graph is at hand")
    return ParityReference(path=Path(fp32_path))


def _input_geometry(model, meta: dict) -> tuple[str, int, tuple[int, int]]:
    inp = model.graph.input[0]
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    if meta.get("inputs"):
        dims = meta["inputs"][0]["shape"]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise QuantizeError(f"graph input {inp.name!r} has shape {dims}; expected (N, C, H, W) with fixed C, H, W")
    return inp.name, int(dims[1]), (int(dims[2]), int(dims[3]))


def quantize_onnx(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    calib_images: int = 256,
    parity_images: int = 64,
    formats: Sequence[str] = ("qdq", "qoperator"),
    method: str = "minmax",
    loaded=None,
    float_convs: int = FLOAT_CONVS,
    verify=None,
    trust_checkpoint: bool = False,
    tolerance=None,
) -> Int8Result:
    """Quantize the fp32 graph ``onnx_path`` into the INT8 ``formats`` in ``out_dir`` (default: beside it).

    Args:
        onnx_path: an fp32 ``model.onnx`` from ``lineside export onnx`` (its metadata beside it).
        out_dir: where ``model.qdq.onnx`` / ``model.qoperator.onnx`` and their ``.json`` go.
        calib: folder / glob / CSV of real frames; None = ELPV train blocks.
        calib_images: how many calibration frames.
        parity_images: frames for the parity check (ELPV val blocks, or ``calib``); 0 skips it.
        formats: any of :data:`INT8_FORMATS`.
        method: ``minmax`` | ``entropy`` | ``percentile`` activation-range calibration.
        loaded: the already loaded checkpoint (parity reference), else the metadata's source checkpoint.
        float_convs: how many of the first convolutions stay float (see :func:`float_inside`).
        trust_checkpoint: the metadata's source checkpoint may load as a full pickle when a weights-only
            load refuses it (see :func:`export.checkpoint.load_inspection_model`).
        verify: runs each graph against its reference (:class:`export.parity.Verifier`); None skips parity.
        tolerance: parity overrides on the int8 limits (``--parity-tolerance`` text, a mapping or a
            :class:`export.parity.Tolerance`; :func:`export.parity.tolerance_for`).
    """
    import inspect

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lineside.export.calibration import real_images
    from lineside.export.metadata import package_versions, read_metadata, write_metadata
    from lineside.export.trt_ops import unsupported_ops

    start = time.perf_counter()
    src = Path(onnx_path)
    if not src.is_file():
        raise QuantizeError(f"{src}: ONNX file not found")
    bad = [f for f in formats if f not in INT8_FORMATS]
    if bad or not formats:
        raise QuantizeError(f"INT8 formats {list(formats)}: choose from {', '.join(INT8_FORMATS)}")
    out = Path(out_dir) if out_dir is not None else src.parent
    out.mkdir(parents=True, exist_ok=True)
    base_meta = read_metadata(src, required=False)
    fp32 = onnx.load(str(src))
    precision = base_meta.get("precision") or graph_precision(fp32)
    if precision != "fp32" or graph_precision(fp32) != "fp32":
        raise QuantizeError(f"{src}: a {precision} graph; INT8 calibration starts from the fp32 graph (`lineside export onnx` without --fp16)")
    input_name, channels, size = _input_geometry(fp32, base_meta)
    images, _ = real_images(calib, size, channels, calib_images, split="train")
    calib_source = os.fspath(calib) if calib is not None else "ELPV train blocks (elpv-dataset package)"
    log.info("calibrating on %d real frames from %s", len(images), calib_source)
    result = Int8Result(src, calibration={"source": calib_source, "n_images": int(len(images)), "method": method, "split": None if calib else "train"})

    with tempfile.TemporaryDirectory(prefix="lineside-int8-") as tmp:
        pre_path, pre_note = _preprocess(src, Path(tmp) / "pre.onnx")
        pre = onnx.load(str(pre_path))
        _name_nodes(pre)
        before, after = float_ends(pre)
        first_convs, head = float_inside(pre, float_convs)
        exclude = list(dict.fromkeys(before + after + first_convs + head))
        onnx.save(pre, str(pre_path))
        # one calibration pass when ONNX Runtime can cache ranges: the widest op-type set first
        cache = Path(tmp) / "ranges.json" if "calibration_cache_path" in inspect.signature(quantize_static).parameters else None
        cached_ops: set[str] = set()
        for fmt in sorted(formats, key=lambda f: -len(INT8_FORMATS[f][2])):
            name, target, op_types = INT8_FORMATS[fmt]
            use_cache = cache if cache is not None and (not cache.exists() or set(op_types) <= cached_ops) else None
            if use_cache is not None and not cache.exists():
                cached_ops = set(op_types)
            dst = out / name
            qdq = fmt == "qdq"
            extra = {
                "QuantizeBias": False,  # int32 biases: TensorRT's parser rejects them; float biases cost nothing
                "ActivationSymmetric": qdq,  # TensorRT takes zero point 0 only
                "WeightSymmetric": True,
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(pre_path), str(dst), _Frames(images, input_name), quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
                    op_types_to_quantize=list(op_types), per_channel=True, reduce_range=False,
                    activation_type=QuantType.QInt8 if qdq else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude, calibrate_method=_calibration_method(method), extra_options=extra,
                    **({"calibration_cache_path": str(use_cache)} if use_cache is not None else {}),
                )
            qmodel = onnx.load(str(dst))
            ops = Counter(n.op_type for n in qmodel.graph.node)
            meta = dict(base_meta)
            meta.update(
                format="onnx",
                precision="int8",
                target=target,
                source_onnx=os.path.abspath(src),
                source_onnx_sha256=base_meta.get("artefact_sha256"),
                quantization={
                    "format": "QDQ" if qdq else "QOperator",
                    "tool": "onnxruntime.quantization.quantize_static",
                    "activations": "int8 symmetric (zero point 0), per tensor" if qdq else "uint8 asymmetric, per tensor",
                    "weights": "int8 symmetric, per output channel",
                    "bias": "float (not quantized)" if qdq else "int32 inside QLinear* kernels",
                    "op_types": list(op_types),
                    "calibration": result.calibration,
                    "pre_process": pre_note,
                    "float_nodes": {"before": len(before), "after": len(after), "first_convs": len(first_convs), "head_elementwise": len(head)},
                    "quantized_ops": {k: v for k, v in sorted(ops.items()) if k.startswith(("Q", "Dequantize", "MatMulInteger", "ConvInteger"))},
                },
                tensorrt_unsupported_ops=unsupported_ops(qmodel),
                versions=dict(base_meta.get("versions") or {}, **package_versions()),
            )
            meta.pop("parity", None)
            if qdq and _int32_bias_inputs(qmodel):
                raise QuantizeError(f"{dst}: int32-quantized biases slipped into the Q/DQ graph; TensorRT would reject it")
            write_metadata(meta, dst, own_file=True)
            result.paths[fmt], result.metadata[fmt] = dst, meta
    result.paths = {f: result.paths[f] for f in formats}

    if parity_images and verify is not None:
        from lineside.export.parity import tolerance_for

        tol = tolerance_for("int8", tolerance)
        pimages, _ = real_images(calib, size, channels, parity_images, split="val")
        reference = parity_reference(base_meta, loaded, src, trust_checkpoint)
        for fmt, dst in result.paths.items():
            report = verify(dst, reference, pimages, tol, batch_size=max(1, min(16, len(pimages))))
            result.parity[fmt] = report
            result.metadata[fmt]["parity"] = report.to_dict()
            write_metadata(result.metadata[fmt], dst, own_file=True)
    result.seconds = time.perf_counter() - start
    return result


def export_int8(
    ckpt: str | os.PathLike | None,
    onnx_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    calib: str | os.PathLike | None = None,
    calib_images: int = 256,
    parity_images: int = 64,
    formats: Sequence[str] = ("qdq", "qoperator"),
    method: str = "minmax",
    input_size=None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    float_convs: int = FLOAT_CONVS,
    verify=None,
    trust_checkpoint: bool = False,
    tolerance=None,
) -> Int8Result:
    """``--ckpt``: export the fp32 graph to ``out_dir/model.onnx`` first; ``--onnx``: start from that graph.
    ``trust_checkpoint``: see :func:`export.checkpoint.load_inspection_model`; ``tolerance``: see :func:`quantize_onnx`."""
    if (ckpt is None) == (onnx_path is None):
        raise QuantizeError("give exactly one of --ckpt (a checkpoint) or --onnx (an fp32 model.onnx)")
    loaded = None
    if ckpt is not None:
        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.onnx_export import export_onnx

        loaded = load_inspection_model(ckpt, trust_checkpoint=trust_checkpoint)
        r = export_onnx(loaded, out_dir, input_size=input_size, batch_sizes=batch_sizes, calib=calib, parity_images=0)
        onnx_path = r.path
    return quantize_onnx(onnx_path, out_dir, calib, calib_images, parity_images, formats, method, loaded, float_convs, verify,
                         trust_checkpoint, tolerance)
