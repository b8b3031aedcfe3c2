"""lineside.runtime: run exported artefacts on data.

One :class:`~lineside.runtime.backend.Backend` interface (named NumPy arrays in, named arrays
out) with one class per format: :class:`TorchBackend` (a checkpoint, eager), 
:class:`OnnxRuntimeBackend` (``.onnx``), :class:`AotiBackend` (``.pt2``) and
:class:`TensorRTBackend` (``.engine``); :func:`load_backend` picks one by the artefact's suffix.
On top of it: batch scoring (:mod:`~lineside.runtime.score`), the line-side station
(:mod:`~lineside.runtime.station`), camera and folder sources, result records and the format
benchmark. It imports ``export`` (to load artefacts) but never Lightning or training code.
"""

from __future__ import annotations

import importlib
from typing import Any

from lineside.runtime.backend import BACKENDS, SUFFIXES, Backend, BackendError, backend_for, load_backend

__all__ = [
    "BACKENDS", "SUFFIXES", "Backend", "BackendError", "backend_for", "load_backend",
    "TorchBackend", "OnnxRuntimeBackend", "AotiBackend", "TensorRTBackend",
]

_LAZY = {name: target.partition(":")[0] for name, target in
         (("TorchBackend", "lineside.runtime.torch_backend:"), ("OnnxRuntimeBackend", "lineside.runtime.onnxruntime_backend:"),
          ("AotiBackend", "lineside.runtime.aoti_backend:"), ("TensorRTBackend", "lineside.runtime.tensorrt_backend:"))}


def __getattr__(name: str) -> Any:  # backends import their runtimes (torch, onnxruntime, TensorRT) only when asked for
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lineside.runtime' has no attribute {name!r}")
