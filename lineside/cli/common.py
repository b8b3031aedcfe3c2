"""Arguments every ``lineside`` command shares, defined once.

The same flag has the same name in every command:

- ``--model`` (alias ``--ckpt``): the checkpoint or exported artefact to load;
- ``--out`` (alias ``--output``): where the command writes its result;
- ``--device``: ``cpu`` or ``cuda[:N]``;
- ``--batch-size``: images per model call;
- ``--trust-checkpoint``: load a checkpoint that a weights-only load refuses (trusted files only);
- ``--adapter``: a LoRA adapter file merged into the checkpoint's weights (one base, one adapter per product).

Each helper adds its flag to a parser (or an argument group / mutually exclusive group)
and returns the action, so a command can still pass its own help text and default.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = [
    "add_model_arg",
    "add_out_arg",
    "add_device_arg",
    "add_batch_size_arg",
    "add_backend_arg",
    "add_trust_checkpoint_arg",
    "add_adapter_arg",
    "MODEL_HELP",
    "CHECKPOINT_HELP",
]

MODEL_HELP = "artefact: .ckpt, .onnx, .pt2, .engine/.plan, or an export folder"
CHECKPOINT_HELP = "checkpoint from `lineside fit` or ensemble.ckpt from `lineside crossval`"


def add_model_arg(parser: Any, *, required: bool = True, help: str = MODEL_HELP, **kwargs: Any) -> argparse.Action:
    """``--model`` / ``--ckpt`` → ``args.model``: the checkpoint or artefact the command loads."""
    return parser.add_argument("--model", "--ckpt", dest="model", required=required, metavar="MODEL", help=help, **kwargs)


def add_out_arg(parser: Any, *, required: bool = True, help: str = "output path", **kwargs: Any) -> argparse.Action:
    """``--out`` / ``--output`` → ``args.out``: where the command writes its result."""
    return parser.add_argument("--out", "--output", dest="out", required=required, metavar="OUT", help=help, **kwargs)


def add_device_arg(parser: Any, *, default: str = "cpu", help: str = "cpu or cuda[:N]", **kwargs: Any) -> argparse.Action:
    """``--device`` → ``args.device``."""
    return parser.add_argument("--device", default=default, help=help, **kwargs)


def add_batch_size_arg(parser: Any, *, default: int = 32, help: str = "images per model call", aliases: tuple[str, ...] = (),
                       **kwargs: Any) -> argparse.Action:
    """``--batch-size`` (plus a command's former spellings in ``aliases``) → ``args.batch_size``."""
    return parser.add_argument("--batch-size", *aliases, dest="batch_size", type=int, default=default, help=help, **kwargs)


BACKEND_HELP = ("auto (default): a checkpoint runs as a cached, parity-checked ONNX export in ONNX Runtime on the CPU and in "
                "eager torch on a GPU; an artefact on the backend its suffix names. Or: torch, onnxruntime, aoti, tensorrt")


def add_backend_arg(parser: Any, *, help: str = BACKEND_HELP, **kwargs: Any) -> argparse.Action:
    """``--backend`` → ``args.backend`` (default ``auto``), read by :func:`lineside.runtime.open_model.open_model`."""
    return parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "aoti", "tensorrt"], help=help, **kwargs)


# -- checkpoint safety ------------------------------------------------------------
# Flags that govern how checkpoints are unpickled go here, beside add_model_arg, so
# every command that loads a checkpoint offers them under one name.

TRUST_CHECKPOINT_HELP = (
    "load a checkpoint whose pickle holds more than weights and plain values (refused by default: unpickling it "
    "can run arbitrary code); only for a file from a trusted source"
)


def add_trust_checkpoint_arg(parser: Any, *, help: str = TRUST_CHECKPOINT_HELP, **kwargs: Any) -> argparse.Action:
    """``--trust-checkpoint`` → ``args.trust_checkpoint`` (default False): checkpoints are read with
    ``weights_only=True`` (:func:`lineside.fusion.checkpoint_file.read_checkpoint`) unless it is given."""
    return parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true", help=help, **kwargs)


ADAPTER_HELP = ("LoRA adapter (adapter.safetensors of a `lineside fit --model.adapter ...` run) merged into the checkpoint's "
                "weights; refused when it was trained on another base. --model ADAPTER.safetensors alone uses the base it records")


def add_adapter_arg(parser: Any, *, help: str = ADAPTER_HELP, **kwargs: Any) -> argparse.Action:
    """``--adapter`` → ``args.adapter`` (default None), read by :func:`lineside.runtime.open_model.open_model`
    and :func:`lineside.export.checkpoint.load_inspection_model` (:mod:`lineside.fusion.adapters`)."""
    return parser.add_argument("--adapter", default=None, metavar="FILE", help=help, **kwargs)
