"""``lineside bench``: every backend on identical real frames, in one run: parity vs eager, latency, throughput.

    lineside bench --model runs/quickstart/checkpoints/best.ckpt                        # CPU
    lineside bench --model best.ckpt --device cuda --input-size 300 --batch-size 144    # a GPU station: one module of 144 cells

For each backend available here (eager torch, torch.compile, ONNX Runtime FP32, ONNX Runtime
INT8, AOTInductor; on a GPU also CUDA graphs, FP16/BF16 autocast and TensorRT when its runtime
is installed) it prints parity against eager (max |Δ| of ``grade_probs``, grade agreement),
latency p50/p99 at batch 1, throughput at ``--batch-size`` and the ratios to eager. A backend that
cannot be built here gets a row saying why; the others still run.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["BenchRow", "CompareRow", "compare_throughput", "format_compare", "run_bench", "format_table"]

log = logging.getLogger("lineside.bench")


@dataclass
class BenchRow:
    backend: str
    parity: str = ""
    max_abs_diff: float | None = None
    agreement: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None
    setup_s: float | None = None
    error: str = ""


def _latency(backend, frame: np.ndarray, iters: int, min_seconds: float = 1.0) -> tuple[float, float]:
    times = []
    start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start) < min_seconds and len(times) < 10 * iters:
        t = time.perf_counter()
        backend(frame)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _throughput(backend, batch: np.ndarray, min_seconds: float = 3.0, min_rounds: int = 3) -> float:
    n, rounds, start = 0, 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - start < min_seconds:
        backend(batch)
        n += len(batch)
        rounds += 1
    return n / (time.perf_counter() - start)


def _builders(ckpt: str, device: str, input_size, workdir: Path, batch: int = 32,
              trust_checkpoint: bool = False) -> list[tuple[str, Callable]]:
    """(name, () -> Backend) for every backend worth trying on ``device``."""
    trust = {"trust_checkpoint": trust_checkpoint}
    from lineside.runtime.backend import load_backend
    from lineside.runtime.torch_backend import TorchBackend

    state: dict = {}

    def onnx_path():
        if "onnx" not in state:
            from lineside.export.onnx_export import export_onnx

            state["onnx"] = export_onnx(ckpt, workdir / "onnx", input_size, parity_images=0, **trust).path
        return state["onnx"]

    def ort_int8():
        from lineside.export.quantize import quantize_onnx

        result = quantize_onnx(onnx_path(), workdir / "int8", calib_images=128, parity_images=0, formats=("qoperator",))
        return load_backend(result.paths["qoperator"])

    def aoti():
        from lineside.export.aoti import export_aoti

        res = export_aoti(ckpt, workdir / f"aoti_{device.split(':')[0]}", input_size, batch_sizes=(1, 8, batch), device=device, parity_images=0,
                          **trust)
        return load_backend(res.path, device=device)

    def tensorrt(precision: str):
        def build():
            from lineside.export.tensorrt import export_tensorrt

            res = export_tensorrt(ckpt, None, workdir / f"trt_{precision}", precision=precision,
                                  batch_sizes=(1, 8, batch), input_size=input_size, parity_images=0, **trust)
            return load_backend(res.path, device=device)

        return build

    rows: list[tuple[str, Callable]] = [("eager", lambda: TorchBackend(ckpt, device, input_size, **trust))]
    if device == "cpu":
        rows += [
            ("torch.compile", lambda: TorchBackend(ckpt, device, input_size, compile=True, **trust)),
            ("onnxruntime fp32", lambda: load_backend(onnx_path())),
            ("onnxruntime int8", ort_int8),
            ("aoti", aoti),
        ]
    else:
        rows += [
            ("torch.compile", lambda: TorchBackend(ckpt, device, input_size, compile=True, **trust)),
            ("cuda graphs (torch.compile reduce-overhead)", lambda: TorchBackend(ckpt, device, input_size, compile="reduce-overhead", **trust)),
            ("eager fp16", lambda: TorchBackend(ckpt, device, input_size, dtype="float16", **trust)),
            ("eager bf16", lambda: TorchBackend(ckpt, device, input_size, dtype="bfloat16", **trust)),
            ("cuda graphs fp16", lambda: TorchBackend(ckpt, device, input_size, compile="reduce-overhead", dtype="float16", **trust)),
            ("aoti", aoti),
            ("onnxruntime fp32", lambda: load_backend(onnx_path(), device=device)),
            ("tensorrt fp16", tensorrt("fp16")),
            ("tensorrt int8", tensorrt("int8")),
        ]
    return rows


def run_bench(ckpt: str, device: str = "cpu", input_size=None, batch: int = 32, iters: int = 30, images: int = 64,
              only: list[str] | None = None, calib: str | None = None, trust_checkpoint: bool = False) -> tuple[list[BenchRow], dict]:
    """Bench every backend; returns the rows and a context dict (machine, inputs).

    ``trust_checkpoint``: a checkpoint that a weights-only load refuses is loaded as a full pickle
    (``--trust-checkpoint``; only for a file from a trusted source)."""
    from lineside.runtime.torch_backend import TorchBackend
    from lineside.export.calibration import real_images
    from lineside.export.parity import TOLERANCES, check_parity

    eager = TorchBackend(ckpt, device, input_size, trust_checkpoint=trust_checkpoint)
    frames, _ = real_images(calib, eager.input_size, eager.channels, max(images, batch), split="test")
    if len(frames) < batch:
        frames = np.concatenate([frames] * (batch // len(frames) + 1))
    frames_b = frames[:batch]
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in _builders(ckpt, device, eager.input_size if input_size else None, Path(tmp), batch, trust_checkpoint):
            if only and not any(o in name for o in only):
                continue
            row = BenchRow(name)
            try:
                t = time.perf_counter()
                backend = eager if name == "eager" else build()
                backend.warmup(1)
                backend.warmup(batch, rounds=1)
                row.setup_s = time.perf_counter() - t
                prec = "int8" if "int8" in name else "fp16" if ("fp16" in name or "bf16" in name) else "fp32"
                rep = check_parity(eager, backend, frames[:images], TOLERANCES["bf16" if "bf16" in name else prec], batch_size=8)
                by = {r.output: r for r in rep.rows}
                row.parity = "PASS" if rep.ok else "FAIL"
                row.max_abs_diff = by["grade_probs"].value if "grade_probs" in by else None
                row.agreement = by["grade"].value if "grade" in by else None
                for _ in range(3):  # settle: compiled backends specialise (and recompile) per shape first
                    backend(frames[:1])
                    backend(frames_b)
                row.p50_ms, row.p99_ms = _latency(backend, frames[:1], iters)
                backend(frames_b)
                row.throughput = _throughput(backend, frames_b)
            except Exception as exc:  # noqa: BLE001 - one backend's failure is a row, the bench goes on
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                log.warning("%s: %s", name, row.error)
            rows.append(row)
            print(_fmt_row(row, rows[0]), file=sys.stderr)
    ctx = _machine(device) | {"ckpt": os.path.abspath(ckpt), "input_size": list(eager.input_size), "batch": batch,
                              "parity_images": images, "frames": "ELPV test blocks" if calib is None else calib}
    return rows, ctx


def _machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "device": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def _fmt_row(r: BenchRow, eager: BenchRow) -> str:
    if r.error:
        return f"| {r.backend} | – | – | – | – | – | – | {r.error} |"
    r1 = eager.p50_ms / r.p50_ms if eager.p50_ms and r.p50_ms else float("nan")
    rt = r.throughput / eager.throughput if eager.throughput and r.throughput else float("nan")
    par = f"{r.parity} ({r.max_abs_diff:.1e}, {100 * r.agreement:.0f}%)" if r.max_abs_diff is not None else r.parity
    return (f"| {r.backend} | {par} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.throughput:.1f} | **{r1:.2f}x** | **{rt:.2f}x** | "
            f"setup {r.setup_s:.0f} s |")


def format_table(rows: list[BenchRow], ctx: dict) -> str:
    head = (f"{ctx['date']}, {ctx['gpu'] or ctx['cpu']} ({ctx['cores']} CPU cores), torch {ctx['torch']}; frames uint8 "
            f"{ctx['input_size'][0]}x{ctx['input_size'][1]} from the {ctx['frames']}; throughput at batch {ctx['batch']}")
    lines = [head, "", f"| backend | parity vs eager (max abs diff grade_probs, grade agreement) | p50 ms (batch 1) | p99 ms (batch 1) | "
             f"img/s (batch {ctx['batch']}) | batch-1 speed vs eager | throughput vs eager | note |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_fmt_row(r, rows[0]) for r in rows]
    return "\n".join(lines)



@dataclass
class CompareRow:
    """One model's throughput in a side-by-side run (:func:`compare_throughput`)."""

    model: str
    outputs: list[str]
    throughput: float
    rounds: list[float]
    ratio: float = 1.0


def compare_throughput(backends: dict[str, object], frames: np.ndarray, rounds: int = 5, min_seconds: float = 2.0) -> list[CompareRow]:
    """Throughput (frames/s) of several models on the same uint8 ``frames`` (one batch), measured in
    interleaved rounds (A, B, A, B …) so that a machine whose load drifts during the run weighs on every
    model alike; each model's figure is the median of its rounds and ``ratio`` is relative to the first."""
    for backend in backends.values():
        backend(frames[:1])
        backend(frames)
    per: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(max(1, rounds)):
        for name, backend in backends.items():
            per[name].append(_throughput(backend, frames, min_seconds=min_seconds, min_rounds=2))
    rows = [CompareRow(name, [s["name"] for s in backend.output_specs], float(np.median(per[name])), per[name])
            for name, backend in backends.items()]
    for r in rows:
        r.ratio = r.throughput / rows[0].throughput if rows[0].throughput else float("nan")
    return rows


def format_compare(rows: list[CompareRow], ctx: dict) -> str:
    head = (f"{ctx['date']}, {ctx['gpu'] or ctx['cpu']} ({ctx['cores']} CPU cores), torch {ctx['torch']}; {ctx.get('backend', 'eager')}; "
            f"the same uint8 frames {ctx['input_size'][0]}x{ctx['input_size'][1]} from the {ctx['frames']}, batch {ctx['batch']}, "
            f"median of {ctx['rounds']} interleaved rounds")
    lines = [head, "", "| model | outputs | img/s | vs first | rounds (img/s) |", "|---|---|---|---|---|"]
    lines += [f"| {r.model} | {', '.join(r.outputs)} | {r.throughput:.1f} | **{r.ratio:.2f}x** | "
              f"{' / '.join(f'{v:.1f}' for v in r.rounds)} |" for r in rows]
    return "\n".join(lines)
