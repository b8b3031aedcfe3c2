"""lineside.export: leave the training code behind.

Loads the pure :class:`fusion.model.InspectionModel` from a training checkpoint without
Lightning (:func:`export.checkpoint.load_inspection_model`). ONNX / TensorRT / AOTInductor
export builds on it.

Names are imported lazily (PEP 562): a station that loads an artefact through
``lineside.export.aoti`` / ``lineside.export.metadata`` does not import the model classes
that reading a checkpoint needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CheckpointError", "LoadedModel", "instantiate_config", "load_inspection_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lineside.export.checkpoint"), name)
    raise AttributeError(f"module 'lineside.export' has no attribute {name!r}")
