"""ONNX Runtime backend: an exported ``model.onnx`` (CPU, or CUDA with onnxruntime-gpu)."""

from __future__ import annotations

import os

import numpy as np

from lineside.runtime.backend import Backend, BackendError, check_artefact_sha256

__all__ = ["OnnxRuntimeBackend"]


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on an exported ``model.onnx`` (CPU, or CUDA when onnxruntime-gpu is installed).

    Args:
        path: the ``.onnx`` file (its metadata beside it; the file must have the sha256 it records).
        device: ``cpu`` or ``cuda[:N]``.
        threads: intra-op threads (0 = ONNX Runtime's default, all cores).
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        from lineside.export.metadata import MetadataError, read_metadata

        super().__init__(path, device)
        if not os.path.isfile(self.path):
            raise BackendError(f"{self.path}: ONNX file not found")
        try:
            self.metadata = read_metadata(self.path)
        except MetadataError as exc:
            raise BackendError(str(exc)) from exc
        check_artefact_sha256(self.path, self.metadata)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("ONNX Runtime here has no CUDA provider (install onnxruntime-gpu) ; use --device cpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        disabled = []
        if self.metadata.get("precision") == "fp16" and not device.startswith("cuda"):
            disabled = ["NchwcTransformer"]  # ONNX Runtime 1.32's CPU NCHWc layout pass segfaults on fp16 EfficientNet graphs
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=providers, disabled_optimizers=disabled)
        except Exception as exc:  # noqa: BLE001 - ORT raises many kinds
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.precision = self.metadata.get("precision", "fp32")
        if self.precision != "fp32":
            self.name = f"onnxruntime-{self.precision}"
        graph_outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise BackendError(f"{self.path}: metadata lists outputs {missing} that the graph lacks ({graph_outputs})")

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {"image": image})
        return dict(zip(self.output_names, outs))

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))
