"""TensorRT engines: one builder for full TensorRT (10/11, GPU stations) and TensorRT-RTX, one runner.

    lineside export tensorrt --ckpt best.ckpt --out export/trt --precision fp16
    lineside export tensorrt --onnx export/quickstart/model.onnx --out export/trt --precision fp32 --batch-sizes 1,8,32
    lineside export tensorrt --ckpt best.ckpt --out export/trt8 --precision int8 --calib my_cells/
    lineside export tensorrt --onnx model.onnx --out trt --flavour tensorrt_rtx --gpu-arch 8.6,8.9   # ahead of time, no GPU

Networks are strongly typed (the only kind TensorRT 11 and TensorRT-RTX build): there are no
FP16/INT8 builder flags and no calibrator classes. The precision comes from the graph:
``fp16`` builds the fp16 ONNX graph (``lineside export onnx --fp16``), ``int8`` the Q/DQ graph
calibrated on real images (:mod:`export.quantize`). With ``--ckpt`` the right graph is exported
first into ``OUT/onnx/``. One optimisation profile spans the dynamic batch ``N``: min 1, opt the
middle of ``--batch-sizes``, max the largest (larger batches are split by the runner).

Flavours: full TensorRT (``import tensorrt``) builds on the GPU it targets; TensorRT-RTX
(``pip install 'lineside[tensorrt]'``, ``import tensorrt_rtx_bindings``) also builds ahead of time
on a machine without a GPU for the compute capabilities given with ``--gpu-arch`` (default: every
Ampere-or-newer architecture the builder knows). ``OUT/model.engine`` gets ``OUT/metadata.json``:
the ONNX graph's metadata plus the TensorRT flavour and version, the target compute
capabilities, the precision and the batch profile. :class:`TensorRTBackend` refuses an engine
built by another flavour or version of TensorRT or for another GPU before deserialising it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence



__all__ = [
    "FLAVOURS",
    "EngineResult",
    "TensorRTError",
    "batch_profile",
    "build_engine",
    "engine_problems",
    "export_tensorrt",
    "import_tensorrt",
    "parse_gpu_arch",
]

log = logging.getLogger("lineside.export")

# flavour → (import names tried in order, display name)
FLAVOURS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorrt": (("tensorrt", "tensorrt_bindings"), "TensorRT"),
    "tensorrt_rtx": (("tensorrt_rtx", "tensorrt_rtx_bindings"), "TensorRT-RTX"),
}
INSTALL_HINT = "pip install 'lineside[tensorrt]' (TensorRT-RTX) or tensorrt-cu12 (full TensorRT, on the GPU station)"


class TensorRTError(RuntimeError):
    """An engine cannot be built (no TensorRT here, a graph TensorRT rejects, wrong precision asked)."""


# -- which TensorRT -----------------------------------------------------------------------------
def import_tensorrt(flavour: str) -> Any | None:
    """The TensorRT module of ``flavour`` (``tensorrt`` or ``tensorrt_rtx``), or None when not installed."""
    names, _ = FLAVOURS[flavour]
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as exc:  # noqa: BLE001 - a broken install (missing libraries) reads like "not installed"
            log.warning("import %s failed: %s", name, exc)
            continue
        if flavour == "tensorrt" and "rtx" in getattr(mod, "__file__", "").lower():
            continue
        if hasattr(mod, "Builder") or hasattr(mod, "Runtime"):
            return mod
    return None


def _installed() -> dict[str, Any]:
    return {f: m for f in FLAVOURS if (m := import_tensorrt(f)) is not None}


def _display(flavour: str, version: str | None = None) -> str:
    name = FLAVOURS.get(flavour, ((), flavour))[1]
    return f"{name} {version}" if version else name


def _same_version(a: str, b: str) -> bool:
    """Engines run only on the TensorRT release that built them: major.minor.patch must match."""
    return str(a).split(".")[:3] == str(b).split(".")[:3]


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def _device_capability(device: str = "cuda") -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(_device_index(device)))  # type: ignore[return-value]


def _device_name(device: str = "cuda") -> str:
    import torch

    return torch.cuda.get_device_name(_device_index(device))


# -- GPU architectures ----------------------------------------------------------------------------
def _cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _parse_cc(text: str) -> tuple[int, int]:
    t = str(text).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in t:
        major, minor = t.split(".", 1)
        return int(major), int(minor)
    if not t.isdigit() or len(t) < 2:
        raise ValueError(f"GPU architecture {text!r}: use a compute capability such as 8.6 or sm89")
    return int(t[:-1]), int(t[-1])


def _rtx_capabilities(trt) -> dict[tuple[int, int], Any]:
    """TensorRT-RTX ``ComputeCapability`` members by (major, minor)."""
    out = {}
    for name, member in getattr(trt, "ComputeCapability").__members__.items():
        if name.startswith("SM") and name[2:].isdigit():
            out[_parse_cc(name)] = member
    return out


def parse_gpu_arch(text: str | Sequence[str] | None) -> list[str] | None:
    """``"8.6,sm89,120"`` → ``["8.6", "8.9", "12.0"]``; ``"current"`` stays; None/"" → None (the default)."""
    if text is None or text == "" or text == []:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        out.append("current" if item.lower() == "current" else _cc_text(_parse_cc(item)))
    return out or None


# -- batch profile --------------------------------------------------------------------------------
def batch_profile(batch_sizes: Sequence[int], opt: int | None = None) -> dict[str, int]:
    """min 1, opt the middle of the asked sizes (or ``opt``), max the largest."""
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes {batch_sizes!r}: give positive integers, e.g. 1,8,32")
    hi = sizes[-1]
    mid = sizes[len(sizes) // 2] if opt is None else int(opt)
    if not 1 <= mid <= hi:
        raise ValueError(f"opt batch {mid} is outside 1..{hi}")
    return {"min": 1, "opt": mid, "max": hi}


# -- building -------------------------------------------------------------------------------------
@dataclass
class EngineResult:
    """What :func:`build_engine` wrote."""

    path: Path
    metadata: dict
    seconds: float = 0.0
    layers: int | None = None
    parity: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.parity is None or self.parity.ok


class _Logger:
    """A TensorRT logger that keeps errors for the exception message and sends the rest to logging."""

    def __new__(cls, trt, verbose: bool = False):
        class L(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's name
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))
                    log.debug("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    (log.info if verbose else log.debug)("TensorRT: %s", msg)
                elif verbose:
                    log.debug("TensorRT: %s", msg)

        return L()


def _choose_flavour(flavour: str) -> tuple[str, Any]:
    installed = _installed()
    if flavour != "auto":
        if flavour not in FLAVOURS:
            raise TensorRTError(f"TensorRT flavour {flavour!r}: choose auto, {', '.join(FLAVOURS)}")
        if flavour not in installed:
            raise TensorRTError(f"{_display(flavour)} is not installed here; {INSTALL_HINT}")
        return flavour, installed[flavour]
    if "tensorrt" in installed and _cuda_available():
        return "tensorrt", installed["tensorrt"]
    if "tensorrt_rtx" in installed:
        return "tensorrt_rtx", installed["tensorrt_rtx"]
    if "tensorrt" in installed:
        raise TensorRTError("full TensorRT builds on the GPU it targets and no CUDA GPU is visible here; "
                            "for an ahead-of-time build without a GPU install TensorRT-RTX: pip install 'lineside[tensorrt]'")
    raise TensorRTError(f"no TensorRT builder is installed here; {INSTALL_HINT}")


def _targets(flavour: str, trt, gpu_arch: list[str] | None, hardware_compat: str) -> tuple[list[str], list[Any], str]:
    """(compute capabilities recorded, builder values to set, hardware compatibility) for the build."""
    if flavour == "tensorrt_rtx":
        known = _rtx_capabilities(trt)
        if gpu_arch == ["current"] or (gpu_arch is None and _cuda_available()):
            if not _cuda_available():
                raise TensorRTError("--gpu-arch current needs a CUDA GPU here; name the target, e.g. --gpu-arch 8.6")
            cc = _device_capability()
            if cc in known:
                return [_cc_text(cc)], [trt.ComputeCapability.CURRENT], "none"
            message = (f"this GPU ({_device_name()}, compute capability {_cc_text(cc)}) is not a TensorRT-RTX target "
                       f"({', '.join(_cc_text(c) for c in sorted(known))}); full TensorRT (--flavour tensorrt) builds for it")
            if gpu_arch == ["current"]:
                raise TensorRTError(message)
            log.warning("%s; building ahead of time for the TensorRT-RTX targets instead", message)
        if gpu_arch is None or gpu_arch == ["current"]:  # ahead of time: every Ampere-or-newer target (Turing lacks fp32 GEMMs in TensorRT-RTX)
            chosen = [c for c in sorted(known) if c >= (8, 0)]
        else:
            chosen = [_parse_cc(a) for a in gpu_arch]
            missing = [_cc_text(c) for c in chosen if c not in known]
            if missing:
                raise TensorRTError(f"TensorRT-RTX {trt.__version__} cannot target compute capability {', '.join(missing)}; "
                                    f"it knows {', '.join(_cc_text(c) for c in sorted(known))}")
        return [_cc_text(c) for c in chosen], [known[c] for c in chosen], "none"
    # full TensorRT: builds for the GPU it runs on (optionally portable over Ampere and newer)
    if not _cuda_available():
        raise TensorRTError("full TensorRT builds on the GPU it targets and no CUDA GPU is visible here; "
                            "build on the station, or ahead of time with TensorRT-RTX (--flavour tensorrt_rtx)")
    cc = _cc_text(_device_capability())
    if gpu_arch not in (None, ["current"]) and gpu_arch != [cc]:
        raise TensorRTError(f"full TensorRT builds for the GPU it runs on (compute capability {cc}), not {', '.join(gpu_arch)}; "
                            "build on the target GPU, or use --hardware-compat ampere+")
    return [cc], [], hardware_compat


def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    flavour: str = "auto",
    gpu_arch: str | Sequence[str] | None = None,
    opt_batch: int | None = None,
    workspace_mb: int | None = None,
    hardware_compat: str = "none",
    verbose: bool = False,
) -> EngineResult:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build ``out_dir/model.engine`` + metadata.

    Args:
        onnx_path: an ONNX graph from ``lineside export onnx`` / ``int8`` (fp32, fp16 or Q/DQ INT8).
        out_dir: where ``model.engine`` and its metadata go.
        precision: the graph's precision, checked against the graph (None = read it off the graph).
        batch_sizes: the batch sizes to serve; the profile spans 1..max with opt in the middle.
        flavour: ``auto`` (full TensorRT with a GPU, else TensorRT-RTX), ``tensorrt``, ``tensorrt_rtx``.
        gpu_arch: TensorRT-RTX target compute capabilities (``"8.6,8.9"``, ``"current"``); None = default.
        opt_batch: the profile's opt batch instead of the middle size.
        workspace_mb: builder workspace limit.
        hardware_compat: full TensorRT only: ``none`` or ``ampere+`` (one engine for Ampere and newer).
    """
    from lineside.export.metadata import package_versions, read_metadata, write_metadata
    from lineside.export.quantize import graph_precision

    start = time.perf_counter()
    src = Path(onnx_path)
    if not src.is_file():
        raise TensorRTError(f"{src}: ONNX file not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = graph_precision(src)
    if found == "int8-qoperator":
        raise TensorRTError(f"{src}: a QOperator INT8 graph (ONNX Runtime's integer kernels); TensorRT takes the Q/DQ graph model.qdq.onnx")
    if precision is not None and precision != found:
        raise TensorRTError(
            f"{src} is an {found} graph, not {precision}: TensorRT networks are strongly typed, the graph decides the precision. "
            + {"fp16": "Export it with `lineside export onnx --fp16`, or pass --ckpt.",
               "int8": "Quantize it with `lineside export int8`, or pass --ckpt.",
               "fp32": "Export the fp32 graph with `lineside export onnx`."}.get(precision, "")
        )
    flavour, trt = _choose_flavour(flavour)
    arch = parse_gpu_arch(gpu_arch)
    hardware_compat = {"none": "none", "ampere+": "ampere_plus", "ampere_plus": "ampere_plus"}.get(hardware_compat, hardware_compat)
    targets, cc_values, hw = _targets(flavour, trt, arch, hardware_compat)

    logger = _Logger(trt, verbose)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTError(f"{_display(flavour)}: cannot create a builder: " + "; ".join(logger.errors[-3:]))
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src.resolve())):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or logger.errors
        raise TensorRTError(f"{_display(flavour, trt.__version__)}'s ONNX parser rejects {src}: " + "; ".join(errors[:5]))
    n_layers = network.num_layers
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    config = builder.create_builder_config()
    for value_i, value in enumerate(cc_values):
        if value_i == 0:
            config.num_compute_capabilities = len(cc_values)
        config.set_compute_capability(value, value_i)
    if hw == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile_dims = None
    dynamic = [t for t in inputs if len(t.shape) and t.shape[0] == -1]
    if dynamic:
        profile_dims = batch_profile(batch_sizes, opt_batch)
        profile = builder.create_optimization_profile()
        for t in inputs:
            rest = tuple(t.shape)[1:]
            if any(d < 0 for d in rest):
                raise TensorRTError(f"input {t.name!r} has dynamic dims besides the batch: {tuple(t.shape)}; export with a fixed --input-size")
            profile.set_shape(t.name, (profile_dims["min"], *rest), (profile_dims["opt"], *rest), (profile_dims["max"], *rest))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{_display(flavour, trt.__version__)} failed to build {src}: " + "; ".join(logger.errors[-5:] or ["no message"]))
    engine_path = out / "model.engine"
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(serialized))
    os.replace(tmp, engine_path)
    seconds = time.perf_counter() - start

    base = read_metadata(src, required=False)
    if not base:
        base = _metadata_from_graph(src)
    sizes = sorted({int(b) for b in batch_sizes}) if profile_dims else [int(inputs[0].shape[0])]
    meta = dict(base)
    meta.pop("parity", None)
    meta.pop("tensorrt_unsupported_ops", None)
    meta.update(
        format="tensorrt",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        precision=found,
        batch_sizes=sizes,
        max_batch_enforced=True,
        batch_profile=profile_dims or {"min": sizes[0], "opt": sizes[0], "max": sizes[0]},
        source_onnx=os.path.abspath(src),
        source_onnx_sha256=base.get("artefact_sha256"),
        source_onnx_precision=found,
        tensorrt={
            "flavour": flavour,
            "name": _display(flavour),
            "version": str(trt.__version__),
            "module": trt.__name__,
            "compute_capabilities": targets,
            "hardware_compatibility": hw,
            "strongly_typed": typed is not None or flavour == "tensorrt_rtx",
            "built_on_gpu": _device_name() if _cuda_available() else None,
            "ahead_of_time": flavour == "tensorrt_rtx" and all(v != trt.ComputeCapability.CURRENT for v in cc_values),
            "network_layers": n_layers,
            "build_seconds": round(seconds, 2),
            "workspace_mb": workspace_mb,
        },
        versions=dict(base.get("versions") or {}, **package_versions(), **{_display(flavour): str(trt.__version__)}),
    )
    folder_meta = read_metadata(out, required=False) if (out / "metadata.json").is_file() else {}
    if folder_meta.get("artefact") not in (None, engine_path.name):
        write_metadata(meta, engine_path, own_file=True)  # e.g. the ONNX graph beside it keeps the folder's metadata.json
    else:
        engine_path.with_name(engine_path.name + ".json").unlink(missing_ok=True)
        write_metadata(meta, engine_path)
    return EngineResult(engine_path, meta, seconds, n_layers)


def _metadata_from_graph(src: Path) -> dict:
    """Minimal metadata of an ONNX graph exported elsewhere (inputs/outputs off the graph)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    np_name = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}

    def spec(v, kind):
        tt = v.type.tensor_type
        shape = [d.dim_param or d.dim_value or "N" for d in tt.shape.dim]
        dtype = np_name.get(tt.elem_type, str(tt.elem_type))
        if kind != "input":
            kind = "decoded" if dtype.startswith(("int", "uint", "bool")) else "float"
        return {"name": v.name, "dtype": dtype, "shape": shape, "kind": kind, "description": ""}

    init = {t.name for t in model.graph.initializer}
    return {
        "task": "unknown",
        "class_names": [],
        "inputs": [spec(v, "input") for v in model.graph.input if v.name not in init],
        "outputs": [spec(v, "output") for v in model.graph.output],
    }


def export_tensorrt(
    ckpt: str | os.PathLike | None,
    onnx_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    precision: str = "fp16",
    batch_sizes: Sequence[int] = (1, 8, 32),
    calib: str | os.PathLike | None = None,
    calib_images: int = 256,
    flavour: str = "auto",
    gpu_arch: str | Sequence[str] | None = None,
    opt_batch: int | None = None,
    workspace_mb: int | None = None,
    hardware_compat: str = "none",
    input_size=None,
    parity_images: int = 32,
    verify=None,
    trust_checkpoint: bool = False,
    tolerance=None,
) -> EngineResult:
    """The graph for ``precision`` (exported / quantized first when needed), then the engine; parity on a GPU.

    ``trust_checkpoint``: see :func:`export.checkpoint.load_inspection_model` (the checkpoint given, or
    the one an ONNX graph's metadata names as its source for the parity reference). ``tolerance``:
    parity overrides on the precision's limits (``--parity-tolerance``; :func:`export.parity.tolerance_for`),
    for the graph's check in ONNX Runtime and the engine's on a GPU."""
    from lineside.export.parity import tolerance_for
    from lineside.export.quantize import graph_precision, quantize_onnx

    tolerance_for(precision, tolerance)  # a malformed override fails before anything is built

    if (ckpt is None) == (onnx_path is None):
        raise TensorRTError("give exactly one of --ckpt (a checkpoint) or --onnx (an ONNX graph)")
    if precision not in ("fp32", "fp16", "int8"):
        raise TensorRTError(f"precision {precision!r}: choose fp32, fp16 or int8")
    out = Path(out_dir)
    notes: list[str] = []
    loaded = None
    if ckpt is not None:
        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.onnx_export import export_onnx

        loaded = load_inspection_model(ckpt, trust_checkpoint=trust_checkpoint)
        r = export_onnx(loaded, out / "onnx", input_size=input_size, batch_sizes=batch_sizes, fp16=precision == "fp16", calib=calib,
                        parity_images=parity_images, verify=verify, tolerance=tolerance)
        graph = r.path
        notes.append(f"ONNX graph {graph} ({r.metadata['precision']})")
        _gate(r.parity, f"the {precision} ONNX graph", notes)
    else:
        graph = Path(onnx_path)
        if not graph.is_file():
            raise TensorRTError(f"{graph}: ONNX file not found")
    if precision == "int8" and graph_precision(graph) == "fp32":
        q = quantize_onnx(graph, graph.parent if ckpt is not None else out / "onnx", calib, calib_images,
                          parity_images=parity_images, formats=("qdq",), loaded=loaded, verify=verify, trust_checkpoint=trust_checkpoint,
                          tolerance=tolerance)
        graph = q.paths["qdq"]
        notes.append(f"INT8 Q/DQ graph {graph} (calibrated on {q.calibration['n_images']} frames of {q.calibration['source']})")
        _gate(q.parity.get("qdq"), "the INT8 Q/DQ graph", notes)
    result = build_engine(graph, out, precision, batch_sizes, flavour, gpu_arch, opt_batch, workspace_mb, hardware_compat)
    result.notes = notes
    # parity of the engine itself needs the GPU it was built for
    if parity_images and verify is not None and _cuda_available():
        from lineside.export.calibration import real_images
        from lineside.export.metadata import write_metadata
        from lineside.export.quantize import parity_reference

        image = next(i for i in result.metadata["inputs"] if i["name"] == "image")
        images, _ = real_images(calib, tuple(image["shape"][2:4]), int(image["shape"][1]), parity_images, split="val")
        # eager torch on the checkpoint when at hand, else the graph the engine was built from in ONNX Runtime
        reference = parity_reference(result.metadata, loaded, Path(result.metadata["source_onnx"]), trust_checkpoint)
        try:
            result.parity = verify(result.path, reference, images, tolerance_for(precision, tolerance), device="cuda",
                                   batch_size=max(1, min(8, len(images))))
        except RuntimeError as exc:  # the engine cannot run on this GPU / runtime
            result.notes.append(f"engine parity skipped: {exc}")
        else:
            result.metadata["parity"] = result.parity.to_dict()
            write_metadata(result.metadata, result.path, own_file=(result.path.with_name("model.engine.json")).is_file())
    elif parity_images:
        result.notes.append("engine parity: skipped (needs an NVIDIA GPU); the graph it was built from was checked in ONNX Runtime")
    return result


def _gate(report, what: str, notes: list[str]) -> None:
    """Stop before building an engine from a graph that failed parity in ONNX Runtime (the rules of
    :mod:`export.parity`: decisions first, near ties forgiven, floats at the precision's derived limits).

    The error names each failing output with its value and limit, and the flags that accept it
    (``--parity-tolerance``) or skip the check (``--parity-images 0``). A passing report goes into
    ``notes`` (the command prints them), with a line for float rows that passed only because every
    decision row passed.
    """
    if report is None:
        return
    if report.ok:
        notes.append(report.table())
        above = [r for r in report.rows if r.metric == "max|Δ|" and r.value > r.limit]
        if above:
            notes.append(f"{what}: " + ", ".join(f"{r.output} max|Δ| {r.value:.2e} above its {report.precision} limit {r.limit:.2e}"
                                                 for r in above) + ", accepted: every decision row passes")
        return
    raise TensorRTError(f"{what} failed its parity check: {report.failure_message()}\n{report.table()}")


# -- running --------------------------------------------------------------------------------------
def engine_problems(meta: dict, flavour: str | None, version: str | None, capability: tuple[int, int] | None = None, gpu_name: str = "") -> list[str]:
    """Why an engine with metadata ``meta`` cannot run on this runtime / GPU (empty when it can).

    Args:
        meta: the engine's metadata (``tensorrt`` block from :func:`build_engine`).
        flavour / version: the runtime here (None = none installed).
        capability: the GPU's compute capability, or None to skip the GPU check.
    """
    info = meta.get("tensorrt") or {}
    want_f, want_v = info.get("flavour"), str(info.get("version") or "")
    built = _display(want_f or "?", want_v)
    rebuild = (f"rebuild it here with `lineside export tensorrt --onnx {meta.get('source_onnx') or 'MODEL.onnx'} --out DIR "
               f"--precision {meta.get('precision', 'fp16')}`")
    if meta.get("format") != "tensorrt" or not want_f or not want_v:
        return ["its metadata has no TensorRT build record (flavour, version, GPU); export it with `lineside export tensorrt`"]
    problems = []
    if flavour is None:
        problems.append(f"it was built with {built} and no {_display(want_f)} runtime is installed here; {INSTALL_HINT}")
    elif flavour != want_f or not _same_version(version or "", want_v):
        problems.append(f"it was built with {built}, this machine runs {_display(flavour, version)}: an engine runs only on the "
                        f"TensorRT flavour and version that built it; {rebuild}")
    if capability is not None and not problems:
        targets = [str(c) for c in info.get("compute_capabilities") or []]
        here = _cc_text(capability)
        if info.get("hardware_compatibility") == "ampere_plus":
            fits = capability >= (8, 0)
            wanted = "Ampere or newer (compute capability 8.0+)"
        else:
            fits = here in targets
            wanted = "compute capability " + (", ".join(targets) or "?")
        if not fits:
            gpu = f"{gpu_name} ({here})" if gpu_name else here
            problems.append(f"it was built for GPU {wanted}, this GPU is {gpu}; rebuild it for this GPU"
                            + (" (--gpu-arch current)" if want_f == "tensorrt_rtx" else " on this station"))
    return problems
