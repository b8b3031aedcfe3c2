"""The ``lineside`` command: one entry point, subcommands in the style of ``yolo`` / ``anomalib``.

    lineside fit --config configs/quickstart.yaml            # Lightning CLI: fit | validate | test | predict
    lineside crossval --config configs/el_grading_cv.yaml --folds 5 --out runs/el_grading_cv
    lineside score --model best.ckpt --input cells/ --output results.csv
    lineside export onnx --model best.ckpt --out export/      # onnx | tensorrt | int8 | aoti | triton
    lineside station --model export/model.onnx --source /camera/drop --out results.jsonl
    lineside serve --model export/model.onnx --replicas 2 --port 8000   # HTTP on Ray Serve
    lineside bench --model best.ckpt
    lineside elpv manifest --split test --out elpv_test.csv   # built-in EL data helpers
    lineside patch-memory fit --input good/ --out memory.pt   # good-only anomaly scores

Each subcommand's ``--help`` lists its options. The shared flags have one name everywhere
(:mod:`lineside.cli.common`): ``--model`` (alias ``--ckpt``), ``--out`` (alias ``--output``),
``--device``, ``--batch-size``. Subcommand modules are imported lazily, so
``lineside station`` on a GPU station never imports Lightning or the training code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

__all__ = ["main", "COMMANDS", "EXPORT_FORMATS"]

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_TRAIN = ("fit", "validate", "test", "predict")  # lineside.cli.train.SUBCOMMANDS, without importing it

# subcommand → ("module:function", one-line help). The function takes argv (list[str]) and
# returns an exit code (or None for 0).
COMMANDS: dict[str, tuple[str, str]] = {
    "crossval": ("lineside.cli.crossval:main", "cross-validated ensemble with out-of-fold decision offsets"),
    "score": ("lineside.cli.score:main", "batch offline scoring of a folder / glob / manifest → CSV or Parquet"),
    "station": ("lineside.cli.station:main", "line-side station loop: folder watch, video, stream or camera → JSONL"),
    "bench": ("lineside.cli.bench:main", "format benchmark: parity, latency and throughput of every backend"),
    "elpv": ("lineside.cli.elpv:main", "built-in ELPV data helpers (manifest of a split)"),
    "patch-memory": ("lineside.cli.patch_memory:main", "good-only anomaly scores and heatmaps (PatchMemory)"),
    "serve": ("lineside.cli.serve:main", "HTTP inspection endpoint on Ray Serve: dynamic batching, replicas, any backend"),
    "prune": ("lineside.cli.prune:main", "structured pruning of the image backbone's channels (torch-pruning) → smaller .ckpt"),
}

EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "onnx": ("lineside.cli.export:onnx_main", "ONNX graph (uint8 in, named outputs) + metadata + parity check"),
    "tensorrt": ("lineside.cli.export:tensorrt_main", "TensorRT / TensorRT-RTX engine (fp32 | fp16 | int8 Q/DQ)"),
    "int8": ("lineside.cli.export:int8_main", "INT8 ONNX graphs calibrated on real images (QDQ for TensorRT, QOperator for ORT)"),
    "aoti": ("lineside.cli.export:aoti_main", "AOTInductor .pt2 package (runs without the training code)"),
    "triton": ("lineside.cli.export:triton_main", "Triton Inference Server model repository"),
}


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = [__doc__.strip().split("\n\n")[0], "", "usage: lineside <command> [options]", "", "commands:"]
    lines.append(f"  {'fit|validate|test|predict':<27} train and evaluate with the Lightning CLI (--config configs/X.yaml)")
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<27} {text}")
    lines.append(f"  {'export <format>':<27} " + ", ".join(EXPORT_FORMATS))
    lines.append("")
    lines.append("`lineside <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from lineside import __version__

        print(f"lineside {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in _TRAIN:
        from lineside.cli.train import main as train_main

        return train_main([command, *rest])
    if command == "export":
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: lineside export <format> [options]\n\nformats:")
            for name, (_, text) in EXPORT_FORMATS.items():
                print(f"  {name:<10} {text}")
            return 0 if rest else 2
        fmt = rest[0]
        if fmt not in EXPORT_FORMATS:
            print(f"lineside export: unknown format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}", file=sys.stderr)
            return 2
        rc = _resolve(EXPORT_FORMATS[fmt][0])(rest[1:])
        return int(rc or 0)
    if command not in COMMANDS:
        print(f"lineside: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    rc = _resolve(COMMANDS[command][0])(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
