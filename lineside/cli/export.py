"""``lineside export <format>``: build an artefact from a checkpoint, then check its parity here.

The builders live in :mod:`lineside.export`; parity runs the artefact with its backend
(:func:`lineside.runtime.verify.verify_artefact`), passed to each builder as ``verify=``, with the
precision's limits (:mod:`lineside.export.parity`) and ``--parity-tolerance`` overrides as ``tolerance=``.
A failed check exits 1 and says on stderr which output failed, its value and limit, and the flag
that accepts it or skips the check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from lineside.cli.common import CHECKPOINT_HELP, add_adapter_arg, add_device_arg, add_model_arg, add_out_arg, add_trust_checkpoint_arg
from lineside.export.aoti import export_aoti
from lineside.export.onnx_export import OPSET, export_onnx, parse_batch_sizes
from lineside.export.parity import parse_tolerance
from lineside.export.quantize import FLOAT_CONVS, INT8_FORMATS, export_int8
from lineside.export.tensorrt import FLAVOURS, export_tensorrt
from lineside.export.triton import LABELS_FILE, _ints, write_repository
from lineside.runtime.verify import verify_artefact

__all__ = ["onnx_main", "tensorrt_main", "int8_main", "aoti_main", "triton_main"]


def _with_adapter(model: str, adapter: str | None, trust_checkpoint: bool):
    """``--model`` as given, or base + LoRA adapter merged (``--adapter``, or ``--model ADAPTER.safetensors``)."""
    if str(model).lower().endswith(".safetensors"):
        from lineside.runtime.open_model import _adapter_base

        model, adapter = _adapter_base(model), model
    if not adapter:
        return model
    from lineside.export.checkpoint import load_inspection_model

    return load_inspection_model(model, trust_checkpoint=trust_checkpoint, adapter=adapter)


def _doc(module: str) -> str:
    """The builder module's docstring (its first paragraph is the command's description)."""
    return importlib.import_module(f"lineside.export.{module}").__doc__ or ""


PARITY_TOLERANCE_HELP = (
    "override parity limits, comma separated: NAME=LIMIT for an output (max |Δ| of a float output, e.g. "
    "grade_probs=0.02; minimum share of a decision, e.g. grade=0.9) or of every output of a kind (heatmap=0.2, "
    "float=0.05), agreement=SHARE for every decision, box_px=PIXELS for box corners, and/or one bare number: a "
    "factor on every limit derived from the precision (2 = twice as loose). Default: the precision's limits "
    "(decisions first, floats at factor·unit roundoff·the output's scale; see lineside.export.parity)")


def _tolerance_arg(text: str) -> dict[str, float]:
    try:
        return parse_tolerance(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_parity_args(ap: argparse.ArgumentParser, images: int, help: str = "frames for the parity check (0 skips it)") -> None:
    """``--parity-images`` and ``--parity-tolerance``, the same on every format."""
    ap.add_argument("--parity-images", type=int, default=images, help=help)
    ap.add_argument("--parity-tolerance", type=_tolerance_arg, default=None, metavar="NAME=LIMIT,…|FACTOR", help=PARITY_TOLERANCE_HELP)


def _parity_failed(cmd: str, what: str, report) -> None:
    print(f"lineside export {cmd}: parity FAILED: {what}: {report.failure_message()}", file=sys.stderr)


def _print_io(metadata: dict) -> None:
    """The artefact's inputs and outputs, one line each."""
    for key, label in (("inputs", "inputs: "), ("outputs", "outputs:")):
        print(f"{label} " + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in metadata[key]))


def _report_parity(cmd: str, what: str, r) -> bool:
    """Print the parity table of a result and keep it in ``parity.json`` beside the artefact; False on failure."""
    if r.parity is None:
        return True
    print(r.parity.table())
    (r.path.parent / "parity.json").write_text(json.dumps(r.parity.to_dict(), indent=2) + "\n")
    if not r.parity.ok:
        _parity_failed(cmd, what, r.parity)
    return r.parity.ok


# -- lineside export onnx ------------------------------------------------------------
def onnx_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export onnx", description=_doc('onnx_export').split("\n\n")[0])
    add_model_arg(ap, help=CHECKPOINT_HELP)
    add_out_arg(ap, help="output folder: model.onnx + metadata.json")
    ap.add_argument("--input-size", default=None, help="H or HxW of the frames the graph takes (default: the training size)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to serve (recorded; TensorRT profiles use them)")
    ap.add_argument("--fp16", action="store_true", help="fp16 weights and compute (uint8 in, fp32 outputs)")
    ap.add_argument("--opset", type=int, default=OPSET)
    ap.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8], help="test-time views in the graph (default: as trained)")
    ap.add_argument("--calib", default=None, help="folder / glob / CSV of your own images for the parity check (default: ELPV cells); "
                    "point models: a folder / glob of .ply/.pcd/.npy clouds in metres (default: the workshop tools' scans)")
    _add_parity_args(ap, 32)
    ap.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    ap.add_argument("--text", default=None, help="models with a text encoder: the prompt baked into the graph (default: no text)")
    add_trust_checkpoint_arg(ap)
    add_adapter_arg(ap, help="LoRA adapter (adapter.safetensors) merged into the graph's weights; parity is checked on the "
                    "merged model. --model ADAPTER.safetensors alone uses the base it records")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        source = _with_adapter(a.model, a.adapter, a.trust_checkpoint)
        r = export_onnx(source, a.out, a.input_size, parse_batch_sizes(a.batch_sizes), a.fp16, a.opset, a.calib,
                        a.parity_images, a.tta, not a.no_simplify, a.text, verify=verify_artefact, trust_checkpoint=a.trust_checkpoint,
                        tolerance=a.parity_tolerance)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export onnx: error: {exc}", file=sys.stderr)
        return 1
    size_mb = r.path.stat().st_size / 1e6
    print(f"wrote {r.path} ({size_mb:.1f} MB, opset {a.opset}, {r.metadata['precision']}) and {r.path.parent / 'metadata.json'} in {r.seconds:.1f} s")
    _print_io(r.metadata)
    if r.unsupported:
        print("operators TensorRT's ONNX parser lacks: " + ", ".join(f"{k} x{v}" for k, v in sorted(r.unsupported.items())))
    else:
        print("TensorRT operator check: every operator is in TensorRT's ONNX support list")
    if not _report_parity("onnx", "the exported graph disagrees with the trained model", r):
        return 1
    return 0 if not r.unsupported else 3


# -- lineside export tensorrt ------------------------------------------------------------
def tensorrt_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export tensorrt", description=_doc('tensorrt').split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    add_model_arg(src, required=False, help="checkpoint: the graph for --precision is exported to OUT/onnx/ first")
    src.add_argument("--onnx", help="an ONNX graph from `lineside export onnx` / `lineside export int8` (fp32 graphs are quantized for int8)")
    add_out_arg(ap, help="output folder: model.engine + metadata.json")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to serve: profile min 1, opt the middle, max the largest")
    ap.add_argument("--opt-batch", type=int, default=None, help="the profile's opt batch (default: the middle of --batch-sizes)")
    ap.add_argument("--calib", default=None, help="int8: folder / glob / CSV of real frames (default: ELPV train-block cells)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--flavour", default="auto", choices=["auto", *FLAVOURS], help="auto: full TensorRT with a GPU, else TensorRT-RTX")
    ap.add_argument("--gpu-arch", default=None,
                    help="TensorRT-RTX targets: compute capabilities such as 8.6,8.9,12.0 or 'current' "
                         "(default: this GPU, or without one every Ampere-or-newer target)")
    ap.add_argument("--hardware-compat", default="none", choices=["none", "ampere+"], help="full TensorRT: one engine for Ampere and newer GPUs")
    ap.add_argument("--workspace-mb", type=int, default=None)
    ap.add_argument("--input-size", default=None, help="with --model: H or HxW of the frames the engine takes")
    _add_parity_args(ap, 32, "frames for the parity check of the graph (ONNX Runtime) and, on a GPU, of the engine (0 skips it)")
    ap.add_argument("--verbose", action="store_true")
    add_trust_checkpoint_arg(ap, help="the checkpoint (--model, or with --onnx the source checkpoint its metadata names) may "
                             "load as a full pickle when a weights-only load refuses it; only for a file from a trusted source")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        r = export_tensorrt(a.model, a.onnx, a.out, a.precision, parse_batch_sizes(a.batch_sizes), a.calib, a.calib_images, a.flavour,
                            a.gpu_arch, a.opt_batch, a.workspace_mb, a.hardware_compat, a.input_size, a.parity_images,
                            verify=verify_artefact, trust_checkpoint=a.trust_checkpoint, tolerance=a.parity_tolerance)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export tensorrt: error: {exc}", file=sys.stderr)
        return 1
    info, prof = r.metadata["tensorrt"], r.metadata["batch_profile"]
    for note in r.notes:
        print(note)
    mb = r.path.stat().st_size / 1e6
    where = "ahead of time" if info["ahead_of_time"] else f"on {info['built_on_gpu']}"
    print(f"built {r.path} ({mb:.1f} MB, {r.metadata['precision']}) with {info['name']} {info['version']} {where} in {r.seconds:.1f} s")
    print(f"  network layers: {r.layers}; GPU targets: compute capability {', '.join(info['compute_capabilities'])}"
          + (" (hardware compatibility: Ampere+)" if info["hardware_compatibility"] == "ampere_plus" else ""))
    print(f"  batch profile: min {prof['min']}, opt {prof['opt']}, max {prof['max']}; metadata: "
          + str(r.path.with_name("model.engine.json") if r.path.with_name("model.engine.json").is_file() else r.path.parent / "metadata.json"))
    if r.parity is not None:
        print(r.parity.table())
        if not r.parity.ok:
            _parity_failed("tensorrt", "the engine disagrees with the trained model", r.parity)
            return 1
    return 0


# -- lineside export int8 ------------------------------------------------------------
def int8_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export int8", description=_doc('quantize').split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    add_model_arg(src, required=False, help="checkpoint: the fp32 graph is exported to OUT/model.onnx first")
    src.add_argument("--onnx", help="an fp32 model.onnx from `lineside export onnx`")
    add_out_arg(ap, help="folder for model.qdq.onnx, model.qoperator.onnx and their .json")
    ap.add_argument("--calib", default=None, help="folder / glob / CSV of real frames (default: ELPV train-block cells)")
    ap.add_argument("--calib-images", type=int, default=256)
    _add_parity_args(ap, 64, "frames for the parity check (ELPV val blocks or --calib); 0 skips it")
    ap.add_argument("--formats", default="qdq,qoperator", help="qdq (TensorRT), qoperator (ONNX Runtime CPU), or both")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"], help="activation-range calibration")
    ap.add_argument("--float-convs", type=int, default=FLOAT_CONVS, help="how many of the first convolutions stay float")
    ap.add_argument("--input-size", default=None, help="with --model: H or HxW of the frames the graph takes")
    ap.add_argument("--batch-sizes", default="1,8,32", help="with --model: batch sizes recorded in the metadata")
    add_trust_checkpoint_arg(ap, help="the checkpoint (--model, or with --onnx the source checkpoint its metadata names) may "
                             "load as a full pickle when a weights-only load refuses it; only for a file from a trusted source")
    ap.add_argument("--post-training", action="store_true",
                    help="a quantization-aware-trained checkpoint (configs/quickstart_qat.yaml) is exported at the scales it "
                    "learnt (lineside.export.qat_export); this flag calibrates it after training instead, as a float model")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if a.model and not a.post_training and _is_qat_checkpoint(a.model, a.trust_checkpoint):
            from lineside.export.qat_export import export_qat

            r = export_qat(a.model, a.out, [f.strip() for f in a.formats.split(",") if f.strip()], a.input_size,
                           parse_batch_sizes(a.batch_sizes), a.calib, a.parity_images, verify_artefact, a.trust_checkpoint,
                           a.parity_tolerance, a.calib_images)
            print("quantization-aware-trained checkpoint: INT8 graphs at the scales it learnt")
        else:
            r = export_int8(a.model, a.onnx, a.out, a.calib, a.calib_images, a.parity_images,
                            [f.strip() for f in a.formats.split(",") if f.strip()], a.method, a.input_size, parse_batch_sizes(a.batch_sizes),
                            a.float_convs, verify=verify_artefact, trust_checkpoint=a.trust_checkpoint, tolerance=a.parity_tolerance)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export int8: error: {exc}", file=sys.stderr)
        return 1
    src_mb = r.source.stat().st_size / 1e6
    cal = r.calibration
    if cal.get("method") == "qat":  # Q/DQ at the learnt scales; QOperator activations calibrated
        act = cal.get("qoperator_activations") or {}
        print("Q/DQ at the scales learnt in QAT" + (f"; QOperator activations calibrated on {act['n_images']} real frames "
              f"({act['source']})" if act else "") + f" in {r.seconds:.1f} s")
    else:
        print(f"calibrated on {cal['n_images']} real frames ({cal['source']}, {cal['method']}) in {r.seconds:.1f} s")
    print(f"  {'graph':<24} {'for':<16} {'MB':>6} {'vs fp32':>8}  quantized ops")
    print(f"  {r.source.name:<24} {'(fp32 source)':<16} {src_mb:>6.2f} {'1.00x':>8}")
    for fmt, path in r.paths.items():
        mb = path.stat().st_size / 1e6
        q = r.metadata[fmt]["quantization"]["quantized_ops"]
        print(f"  {path.name:<24} {INT8_FORMATS[fmt][1]:<16} {mb:>6.2f} {src_mb / mb:>7.2f}x  " + ", ".join(f"{k} x{v}" for k, v in q.items()))
    for fmt, report in r.parity.items():
        print(report.table())
    if r.parity:
        (Path(a.out) / "parity.int8.json").write_text(json.dumps({f: p.to_dict() for f, p in r.parity.items()}, indent=2) + "\n")
    if not r.ok:
        for fmt, report in r.parity.items():
            if not report.ok:
                _parity_failed("int8", f"{r.paths[fmt].name} disagrees with the trained model beyond the int8 limits", report)
        return 1
    return 0


def _is_qat_checkpoint(path: str, trust_checkpoint: bool) -> bool:
    """Does the checkpoint carry the quantizers of a quantization-aware training (:mod:`lineside.fusion.qat`)?"""
    from lineside.fusion.checkpoint_file import read_checkpoint
    from lineside.fusion.qat import QAT_KEY

    ckpt = read_checkpoint(str(path), "cpu", trust_checkpoint)
    return isinstance(ckpt, dict) and bool(ckpt.get(QAT_KEY))


# -- lineside export aoti ------------------------------------------------------------
def aoti_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export aoti", description=_doc('aoti').split("\n\n")[0])
    add_model_arg(ap, help=CHECKPOINT_HELP)
    add_out_arg(ap, help="output folder: model.pt2 + metadata.json")
    ap.add_argument("--input-size", default=None, help="H or HxW of the frames the package takes (default: the training size)")
    add_device_arg(ap, help="cpu or cuda[:N]: the device the package is compiled for (and only runs on)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to serve; the largest bounds the dynamic batch (bigger calls are split)")
    ap.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8], help="test-time views in the graph (default: as trained)")
    ap.add_argument("--calib", default=None, help="folder / glob / CSV of your own images for the parity check (default: ELPV cells)")
    _add_parity_args(ap, 32)
    ap.add_argument("--max-autotune", action="store_true", help="let Inductor benchmark kernel variants (GPU; compiles much longer)")
    add_trust_checkpoint_arg(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU hosts
    configs = {"max_autotune": True} if a.max_autotune else None
    try:
        r = export_aoti(a.model, a.out, a.input_size, parse_batch_sizes(a.batch_sizes), a.device, a.calib, a.parity_images, a.tta, configs,
                        verify=verify_artefact, trust_checkpoint=a.trust_checkpoint, tolerance=a.parity_tolerance)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export aoti: error: {exc}", file=sys.stderr)
        return 1
    aoti = r.metadata["aoti"]
    size_mb = r.path.stat().st_size / 1e6
    print(f"wrote {r.path} ({size_mb:.1f} MB, {aoti['device']}, batch 1..{aoti['max_batch']}) and {r.path.parent / 'metadata.json'} "
          f"in {r.seconds:.1f} s (compile {aoti['compile_seconds']:.1f} s)")
    _print_io(r.metadata)
    return 0 if _report_parity("aoti", "the compiled package disagrees with the trained model", r) else 1


# -- lineside export triton ------------------------------------------------------------
def triton_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export triton", description=_doc('triton').split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    add_model_arg(src, required=False, help="checkpoint: exported to ONNX first (with the parity check)")
    src.add_argument("--onnx", help="model.onnx from `lineside export onnx` (its metadata.json beside it)")
    ap.add_argument("--engine", default=None, help="TensorRT engine (.engine/.plan) to serve instead of the ONNX graph "
                    "(its metadata.json, else that of --onnx / --model)")
    add_out_arg(ap, help="model repository folder (tritonserver --model-repository)")
    ap.add_argument("--name", default="lineside_grader", help="model name in the repository")
    ap.add_argument("--version", type=int, default=1, help="model version folder")
    ap.add_argument("--max-batch", type=int, default=32, help="max_batch_size: the largest batch Triton forms")
    ap.add_argument("--preferred-batch-sizes", default=None, help="dynamic batching targets, each ≤ --max-batch (default: 8,16,32 up to it)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000, help="longest wait for a fuller batch, µs")
    ap.add_argument("--instances", type=int, default=1, help="model instances (per GPU with --kind gpu)")
    ap.add_argument("--kind", default="gpu", choices=["gpu", "cpu"], help="instance kind")
    ap.add_argument("--input-size", default=None, help="with --model: H or HxW of the frames (default: the training size)")
    ap.add_argument("--calib", default=None, help="with --model: your own images for the parity check (default: ELPV cells)")
    _add_parity_args(ap, 32, "with --model: images for the parity check (0 skips it)")
    add_trust_checkpoint_arg(ap)
    a = ap.parse_args(argv)
    if not (a.model or a.onnx or a.engine):
        ap.error("give --model, --onnx or --engine")
    try:
        if a.preferred_batch_sizes:
            preferred = _ints(a.preferred_batch_sizes, "--preferred-batch-sizes")
        else:
            preferred = [b for b in (8, 16, 32) if b <= a.max_batch] or [max(1, a.max_batch)]
        with tempfile.TemporaryDirectory(prefix="lineside-triton-") as tmp:
            onnx = a.onnx
            if a.model:
                r = export_onnx(a.model, tmp, a.input_size, sorted({1, *preferred, a.max_batch}), calib=a.calib, parity_images=a.parity_images,
                               verify=verify_artefact, trust_checkpoint=a.trust_checkpoint, tolerance=a.parity_tolerance)
                if r.parity is not None:
                    print(r.parity.table())
                    if not r.parity.ok:
                        _parity_failed("triton", "the exported graph disagrees with the trained model", r.parity)
                        return 1
                onnx = r.path
            repo = write_repository(a.out, onnx, a.engine, a.name, a.version, a.max_batch, preferred, a.max_queue_delay_us,
                                    a.instances, a.kind)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export triton: error: {exc}", file=sys.stderr)
        return 1
    cfg = repo.config
    print(f"wrote {repo.model_dir}/: config.pbtxt, {repo.artefact.relative_to(repo.model_dir)}, "
          f"{repo.artefact.parent.relative_to(repo.model_dir)}/metadata.json" + (f", {LABELS_FILE}" if (repo.model_dir / LABELS_FILE).is_file() else ""))
    print(f"  {cfg.platform}, max_batch_size {cfg.max_batch_size}, dynamic batching {list(cfg.dynamic_batching.preferred_batch_size)} "
          f"within {cfg.dynamic_batching.max_queue_delay_microseconds} µs, {a.instances} {a.kind} instance(s)")
    print("  inputs:  " + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in repo.metadata["inputs"]))
    print("  outputs: " + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in repo.metadata["outputs"]))
    for note in repo.notes:
        print(f"  note: {note}")
    print(f"serve:   tritonserver --model-repository {Path(a.out).resolve()}")
    return 0
