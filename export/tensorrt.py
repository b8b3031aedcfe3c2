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

import argparse
import datetime as _dt
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lineside.export.backends import Backend, BackendError

__all__ = [
    "FLAVOURS",
    "EngineResult",
    "TensorRTBackend",
    "TensorRTError",
    "batch_profile",
    "build_engine",
    "engine_problems",
    "export_tensorrt",
    "import_tensorrt",
    "main",
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
) -> EngineResult:
    """The graph for ``precision`` (exported / quantized first when needed), then the engine; parity on a GPU."""
    from lineside.export.quantize import graph_precision, quantize_onnx

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

        loaded = load_inspection_model(ckpt)
        r = export_onnx(loaded, out / "onnx", input_size=input_size, batch_sizes=batch_sizes, fp16=precision == "fp16", calib=calib,
                        parity_images=parity_images)
        graph = r.path
        notes.append(f"ONNX graph {graph} ({r.metadata['precision']})")
        _gate(r.parity, f"the {precision} ONNX graph", notes)
    else:
        graph = Path(onnx_path)
        if not graph.is_file():
            raise TensorRTError(f"{graph}: ONNX file not found")
    if precision == "int8" and graph_precision(graph) == "fp32":
        q = quantize_onnx(graph, graph.parent if ckpt is not None else out / "onnx", calib, calib_images,
                          parity_images=parity_images, formats=("qdq",), loaded=loaded)
        graph = q.paths["qdq"]
        notes.append(f"INT8 Q/DQ graph {graph} (calibrated on {q.calibration['n_images']} frames of {q.calibration['source']})")
        _gate(q.parity.get("qdq"), "the INT8 Q/DQ graph", notes)
    result = build_engine(graph, out, precision, batch_sizes, flavour, gpu_arch, opt_batch, workspace_mb, hardware_compat)
    result.notes = notes
    # parity of the engine itself needs the GPU it was built for
    if parity_images and _cuda_available():
        try:
            engine = TensorRTBackend(result.path)
        except BackendError as exc:
            result.notes.append(f"engine parity skipped: {exc}")
        else:
            from lineside.export.calibration import real_images
            from lineside.export.parity import check_parity
            from lineside.export.quantize import _reference_backend

            images, _ = real_images(calib, engine.input_size, engine.channels, parity_images, split="val")
            # eager torch on the checkpoint when at hand, else the graph the engine was built from in ONNX Runtime
            reference = _reference_backend(result.metadata, loaded, Path(result.metadata["source_onnx"]))
            result.parity = check_parity(reference, engine, images, precision, batch_size=max(1, min(8, len(images))))
            from lineside.export.metadata import write_metadata

            result.metadata["parity"] = result.parity.to_dict()
            write_metadata(result.metadata, result.path, own_file=(result.path.with_name("model.engine.json")).is_file())
    elif parity_images:
        result.notes.append("engine parity: skipped (needs an NVIDIA GPU); the graph it was built from was checked in ONNX Runtime")
    return result


def _gate(report, what: str, notes: list[str]) -> None:
    """Stop on a graph whose float outputs (or anything but decided-class agreement) fail parity in ONNX Runtime.

    A lower agreement alone comes from near-tied classes flipping under another numeric path
    (ONNX Runtime's CPU fp16/int8 kernels are not TensorRT's): noted, not fatal; the engine's
    own parity runs on the GPU.
    """
    if report is None or report.ok:
        return
    if all(r.ok or r.metric == "agreement" for r in report.rows):
        notes.append(f"{what}: decided classes agree below the tolerance in ONNX Runtime (near ties), float outputs within it:\n"
                     + report.table())
        return
    raise TensorRTError(f"{what} failed its parity check:\n{report.table()}")


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


_TORCH_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool",
}


class TensorRTBackend(Backend):
    """A ``model.engine`` on the TensorRT runtime it was built for (full TensorRT or TensorRT-RTX), on an NVIDIA GPU.

    Before deserialising, the engine's metadata is checked against the installed runtime
    (flavour and version) and the GPU (compute capability); a mismatch is a :class:`BackendError`
    that says what was built for what. I/O tensors are torch CUDA tensors (no pycuda).

    Args:
        path: the ``.engine`` / ``.plan`` file (metadata beside it).
        device: ``cuda`` / ``cuda:N`` (``cpu``, the generic default of ``load_backend``, means ``cuda:0``).
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", **_: Any) -> None:
        from lineside.export.metadata import MetadataError, file_sha256, read_metadata

        device = "cuda:0" if device in ("cpu", "cuda", "", None) else device
        if not str(device).startswith("cuda"):
            raise BackendError(f"TensorRT engines run on an NVIDIA GPU; device {device!r} is not one")
        super().__init__(path, device)
        if not os.path.isfile(self.path):
            raise BackendError(f"{self.path}: engine file not found")
        try:
            self.metadata = read_metadata(self.path)
        except MetadataError as exc:
            raise BackendError(str(exc)) from exc
        info = self.metadata.get("tensorrt") or {}
        flavour = info.get("flavour")
        trt = import_tensorrt(flavour) if flavour in FLAVOURS else None
        here_flavour, here_version = (flavour, str(trt.__version__)) if trt is not None else next(
            ((f, str(m.__version__)) for f, m in _installed().items()), (None, None))
        problems = engine_problems(self.metadata, here_flavour, here_version)
        if problems:
            raise BackendError(f"{self.path}: refused: " + "; ".join(problems))
        want_sha = self.metadata.get("artefact_sha256")
        if want_sha and file_sha256(self.path) != want_sha:
            raise BackendError(f"{self.path}: its metadata describes another engine file (sha256 differs); rebuild or copy both together")
        if not _cuda_available():
            raise BackendError(f"{self.path}: running a TensorRT engine needs an NVIDIA GPU with CUDA; none is visible here "
                               "(torch.cuda.is_available() is False). Use the ONNX graph with ONNX Runtime on this machine")
        capability, gpu = _device_capability(device), _device_name(device)
        problems = engine_problems(self.metadata, here_flavour, here_version, capability, gpu)
        if problems:
            raise BackendError(f"{self.path}: refused: " + "; ".join(problems))
        self.trt, self.flavour = trt, flavour
        self.precision = self.metadata.get("precision", "fp32")
        self.name = f"tensorrt-{self.precision}" if flavour == "tensorrt" else f"tensorrt_rtx-{self.precision}"
        self._load()

    def _load(self) -> None:
        import torch

        trt = self.trt
        self.torch_device = torch.device(self.device)
        torch.cuda.set_device(self.torch_device)
        self._logger = _Logger(trt)
        self.runtime = trt.Runtime(self._logger)
        data = Path(self.path).read_bytes()
        validity, diag = None, None
        if hasattr(self.runtime, "get_engine_validity"):
            try:
                validity, diag = self.runtime.get_engine_validity(data[: getattr(self.runtime, "engine_header_size", len(data))])
            except Exception:  # noqa: BLE001 - runtimes without the header check: the deserialiser decides
                validity = None
            if validity is not None and validity == trt.EngineValidity.INVALID:
                raise BackendError(f"{self.path}: {_display(self.flavour, trt.__version__)} says the engine cannot run here (diagnostics {diag!r})")
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"{self.path}: {_display(self.flavour, trt.__version__)} cannot deserialise it: " + "; ".join(self._logger.errors[-3:]))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{self.path}: cannot create an execution context: " + "; ".join(self._logger.errors[-3:]))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.engine_outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = [n for n in self.output_names if n not in self.engine_outputs]
        if missing:
            raise BackendError(f"{self.path}: metadata lists outputs {missing} that the engine lacks ({self.engine_outputs})")
        self._dtypes = {n: getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name]) for n in names}
        self.stream = torch.cuda.Stream(self.torch_device)

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self._run_named({self.input_names[0]: image})

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.device(self.torch_device):
            keep = []  # the input tensors stay alive until the engine has run
            for name in self.input_names:
                x = torch.from_numpy(inputs[name]).to(self.torch_device, non_blocking=True)
                if x.dtype != self._dtypes[name]:
                    x = x.to(self._dtypes[name])
                x = x.contiguous()
                keep.append(x)
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
            outs = {}
            for n in self.engine_outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                outs[n] = torch.empty(shape, dtype=self._dtypes[n], device=self.torch_device)
                self.context.set_tensor_address(n, outs[n].data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.torch_device))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError(f"{self.path}: TensorRT execution failed: " + "; ".join(self._logger.errors[-3:]))
            self.stream.synchronize()
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in outs.items() if n in self.output_names}

    def close(self) -> None:
        for attr in ("context", "engine", "runtime"):
            if hasattr(self, attr):
                delattr(self, attr)


# -- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from lineside.export.onnx_export import parse_batch_sizes

    ap = argparse.ArgumentParser(prog="lineside export tensorrt", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint: the graph for --precision is exported to OUT/onnx/ first")
    src.add_argument("--onnx", help="an ONNX graph from `lineside export onnx` / `lineside export int8` (fp32 graphs are quantized for int8)")
    ap.add_argument("--out", required=True, help="output folder: model.engine + metadata.json")
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
    ap.add_argument("--input-size", default=None, help="with --ckpt: H or HxW of the frames the engine takes")
    ap.add_argument("--parity-images", type=int, default=32)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        r = export_tensorrt(a.ckpt, a.onnx, a.out, a.precision, parse_batch_sizes(a.batch_sizes), a.calib, a.calib_images, a.flavour,
                            a.gpu_arch, a.opt_batch, a.workspace_mb, a.hardware_compat, a.input_size, a.parity_images)
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
            print("lineside export tensorrt: parity FAILED: the engine disagrees with the trained model", file=sys.stderr)
            return 1
    return 0
