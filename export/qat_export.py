"""INT8 graphs of a quantization-aware-trained (QAT) checkpoint, at the scales it learnt.

    lineside export int8 --ckpt runs/quickstart_qat/checkpoints/best.ckpt --out export/qat   # a QAT checkpoint: this path

A QAT checkpoint (``lineside fit --config configs/quickstart_qat.yaml``, :mod:`fusion.qat`) holds
float weights plus, under ``checkpoint["lineside_qat"]``, the quantizers it trained with. Here the
model is rebuilt fake-quantized, its quantizers frozen (:func:`fusion.qat.freeze_qat`), and:

``model.qdq.onnx`` (for TensorRT)
    exported by ``torch.onnx`` straight from the frozen fake-quant model, so the graph *is* the
    model that trained: every quantized Conv / Gemm / MatMul reads ``DequantizeLinear`` of an INT8
    symmetric per-tensor activation (zero point 0) and of an INT8 weight initializer (symmetric,
    per output channel, folded here from the exporter's ``QuantizeLinear`` of the float weight);
    biases stay float (TensorRT's parser rejects int32 biases). Strongly typed TensorRT / TensorRT-RTX
    networks build INT8 from it with no calibrator.
``model.qoperator.onnx`` (for ONNX Runtime on the CPU)
    ``QLinearConv`` / ``QLinearMatMul`` / ``QGemm`` … with UINT8 activations, made by
    :func:`export.quantize.quantize_onnx` from the fp32 graph of the QAT weights (``fp32/model.onnx``).
    Its INT8 weights are the trained ones (the same symmetric per-channel grid ``max|w| / 127``; batch
    norm folds into it channel by channel); its activation ranges are calibrated on real ELPV
    *train*-block cells (``--calib``), because ONNX Runtime's integer kernels take the quantized
    output of every layer, which the TensorRT placement (inputs only) does not give it.

Both are checked against the fake-quantized eager model on real ELPV *val*-block cells (or
``--calib``) at the int8 limits of :mod:`export.parity`. Post-training INT8 of a float checkpoint
stays ``lineside export int8`` (:mod:`export.quantize`); a QAT checkpoint also loads there as a
float model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lineside.export.quantize import (
    Int8Result,
    QuantizeError,
    _int32_bias_inputs,
    graph_precision,
)

__all__ = ["QAT_FORMATS", "export_qat", "fold_weight_quantizers", "load_qat_model"]

log = logging.getLogger("lineside.export")

# format → (file name, target)
QAT_FORMATS: dict[str, tuple[str, str]] = {"qdq": ("model.qdq.onnx", "tensorrt"), "qoperator": ("model.qoperator.onnx", "onnxruntime-cpu")}


def load_qat_model(ckpt: str | os.PathLike, trust_checkpoint: bool = False, frozen: bool = True):
    """The checkpoint's model, fake-quantized with the quantizers it trained with (a
    :class:`export.checkpoint.LoadedModel`); ``frozen``: quantizers at fixed scales, ready to export."""
    from lineside.export.checkpoint import load_inspection_model
    from lineside.fusion.checkpoint_file import read_checkpoint
    from lineside.fusion.qat import QAT_KEY, freeze_qat, load_qat_state

    path = os.fspath(ckpt)
    raw = read_checkpoint(path, "cpu", trust_checkpoint)
    qat = raw.get(QAT_KEY) if isinstance(raw, dict) else None
    if not qat:
        raise QuantizeError(f"{path}: not a quantization-aware-trained checkpoint (no {QAT_KEY!r} entry); fine-tune it with "
                            "`lineside fit --config configs/quickstart_qat.yaml`, or quantize it after training with `lineside export int8`")
    loaded = load_inspection_model(path, trust_checkpoint=trust_checkpoint)
    load_qat_state(loaded.model, qat["spec"], qat["state"], path)
    if frozen:
        loaded.model = freeze_qat(loaded.model)
    loaded.model.eval()
    return loaded


def fold_weight_quantizers(model) -> int:
    """Replace ``QuantizeLinear`` (+ its INT8 ``Clip``) of constant float weights by INT8 initializers
    feeding the ``DequantizeLinear`` (what TensorRT and ONNX Runtime's QDQ fusions expect). Returns the count."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    drop, new_inits, folded = [], [], 0
    for n in g.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        w, scale, zp = (value(t) for t in n.input[:3])
        if w is None or scale is None or zp is None or w.ndim < 2:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        lo, hi = info.min, info.max
        out, users = n.output[0], consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "Clip":  # quantize_per_channel's clamp to quant_min/quant_max
            clip = users[0]
            bounds = [value(t) if t else None for t in clip.input[1:3]]
            lo = int(bounds[0]) if len(bounds) > 0 and bounds[0] is not None else lo
            hi = int(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else hi
            drop.append(clip)
            out = clip.output[0]
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.int64), lo, hi).astype(zp.dtype)
        new_inits.append(numpy_helper.from_array(q, out))
        drop.append(n)
        folded += 1
    ids = {id(n) for n in drop}
    keep = [n for n in g.node if id(n) not in ids]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    onnx.checker.check_model(model)
    return folded


def _spec(ckpt, trust_checkpoint: bool) -> dict:
    from lineside.fusion.checkpoint_file import read_checkpoint
    from lineside.fusion.qat import QAT_KEY

    return dict((read_checkpoint(os.fspath(ckpt), "cpu", trust_checkpoint).get(QAT_KEY) or {}).get("spec") or {})


def export_qat(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("qdq", "qoperator"),
    input_size=None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    calib: str | os.PathLike | None = None,
    parity_images: int = 64,
    verify=None,
    trust_checkpoint: bool = False,
    tolerance=None,
    calib_images: int = 256,
) -> Int8Result:
    """Write the QAT checkpoint's INT8 graphs (:data:`QAT_FORMATS`) to ``out_dir`` with metadata, and
    check each against the fake-quantized eager model on ``parity_images`` real frames (``verify``;
    None skips). ``tolerance``: overrides on the int8 limits (:func:`export.parity.tolerance_for`)."""
    import onnx
    import torch
    from lineside.export.deployable import build_deployable, parse_size
    from lineside.export.metadata import (
        build_metadata,
        package_versions,
        read_metadata,
        write_metadata,
    )
    from lineside.export.onnx_export import (
        OPSET,
        onnx_graph,
        parity_inputs,
        parse_batch_sizes,
    )
    from lineside.export.parity import ParityReference, tolerance_for
    from lineside.export.trt_ops import unsupported_ops

    start = time.perf_counter()
    bad = [f for f in formats if f not in QAT_FORMATS]
    if bad or not formats:
        raise QuantizeError(f"QAT formats {list(formats)}: choose from {', '.join(QAT_FORMATS)}")
    loaded = load_qat_model(ckpt, trust_checkpoint)
    size = parse_size(input_size) if isinstance(input_size, (str, int)) else input_size
    deployable = build_deployable(loaded, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qdq = out / QAT_FORMATS["qdq"][0]
    raw = onnx_graph(deployable, out / "model.qat.raw.onnx", OPSET, simplify=True)
    model = onnx.load(str(raw))
    raw.unlink(missing_ok=True)
    folded = fold_weight_quantizers(model)
    onnx.save(model, str(qdq))
    if _int32_bias_inputs(model):
        raise QuantizeError(f"{qdq}: int32-quantized biases in the Q/DQ graph; TensorRT would reject it")
    from lineside.fusion.qat import quantized_modules

    result = Int8Result(qdq, calibration={"source": "quantization-aware training (scales learnt in fine-tuning)",
                                                          "n_images": 0, "method": "qat", "split": None})
    paths = {"qdq": qdq}
    if "qoperator" in formats:
        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.onnx_export import export_onnx
        from lineside.export.quantize import quantize_onnx

        float_model = load_inspection_model(ckpt, trust_checkpoint=trust_checkpoint)  # the QAT weights, without quantizers
        fp32 = export_onnx(float_model, out / "fp32", input_size=size, batch_sizes=batch_sizes, parity_images=0).path
        spec = _spec(ckpt, trust_checkpoint)
        r = quantize_onnx(fp32, out, calib, calib_images, 0, ("qoperator",), "minmax", float_model, spec.get("float_convs", 3))
        paths["qoperator"] = r.paths["qoperator"]
        result.calibration["qoperator_activations"] = r.calibration
        result.source = fp32  # the size reference: the fp32 graph of the same weights
    base = build_metadata(deployable, loaded, "onnx", precision="int8", opset=OPSET, batch_sizes=parse_batch_sizes(batch_sizes),
                          exporter=f"torch.onnx (dynamo), torch {torch.__version__}, onnxslim")
    layers = len(quantized_modules(loaded.model))
    for fmt in formats:
        dst = paths[fmt]
        g = onnx.load(str(dst))
        ops = Counter(n.op_type for n in g.graph.node)
        meta = dict(base) if fmt == "qdq" else dict(read_metadata(dst))
        meta.update(
            artefact=dst.name, target=QAT_FORMATS[fmt][1],
            quantization={
                "format": "QDQ" if fmt == "qdq" else "QOperator",
                "tool": "quantization-aware training (lineside.fusion.qat, torch.ao fake quantization)"
                        + ("" if fmt == "qdq" else "; onnxruntime.quantization.quantize_static of the QAT weights"),
                "activations": "int8 symmetric (zero point 0), per tensor, inputs of the quantized layers, learnt in QAT" if fmt == "qdq"
                               else "uint8 asymmetric, per tensor, calibrated (minmax) on real frames",
                "weights": "int8 symmetric, per output channel, max|w|/127 grid (as trained)",
                "bias": "float (not quantized)" if fmt == "qdq" else "int32 inside QLinear* kernels",
                "layers": layers, "weights_folded": folded,
                "calibration": result.calibration,
                "quantized_ops": {k: v for k, v in sorted(ops.items()) if k.startswith(("Q", "Dequantize", "MatMulInteger", "ConvInteger"))},
            },
            tensorrt_unsupported_ops=unsupported_ops(g) if fmt == "qdq" else {},
            versions=dict(base.get("versions") or {}, **package_versions()),
        )
        meta.pop("parity", None)
        if graph_precision(g) not in ("int8", "int8-qoperator"):
            raise QuantizeError(f"{dst}: no quantized operators in the graph")
        write_metadata(meta, dst, own_file=True)
        result.paths[fmt], result.metadata[fmt] = dst, meta
    if parity_images and verify is not None:
        tol = tolerance_for("int8", tolerance)
        images = parity_inputs(deployable, loaded, calib, parity_images)
        reference = ParityReference(deployable, loaded)
        for fmt, dst in result.paths.items():
            report = verify(dst, reference, images, tol, batch_size=max(1, min(16, len(images))))
            result.parity[fmt] = report
            result.metadata[fmt]["parity"] = report.to_dict()
            write_metadata(result.metadata[fmt], dst, own_file=True)
    result.seconds = time.perf_counter() - start
    return result
