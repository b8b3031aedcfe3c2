"""lineside.export: leave the training code behind.

Loads the pure :class:`fusion.model.InspectionModel` from a training checkpoint without
Lightning (:func:`export.checkpoint.load_inspection_model`). ONNX / TensorRT / AOTInductor
export builds on it.
"""

from lineside.export.checkpoint import CheckpointError, LoadedModel, instantiate_config, load_inspection_model

__all__ = ["CheckpointError", "LoadedModel", "instantiate_config", "load_inspection_model"]
