"""TensorRT backend: a ``model.engine`` on the TensorRT (or TensorRT-RTX) runtime it was built for, on an NVIDIA GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lineside.export import tensorrt as _trt  # GPU probes through the module: one place to stub them in tests
from lineside.export.tensorrt import FLAVOURS, _display, _installed, _Logger, engine_problems, import_tensorrt
from lineside.runtime.backend import Backend, BackendError, check_artefact_sha256

__all__ = ["TensorRTBackend"]

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
        from lineside.export.metadata import MetadataError, read_metadata

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
        check_artefact_sha256(self.path, self.metadata)
        if not _trt._cuda_available():
            raise BackendError(f"{self.path}: running a TensorRT engine needs an NVIDIA GPU with CUDA; none is visible here "
                               "(torch.cuda.is_available() is False). Use the ONNX graph with ONNX Runtime on this machine")
        capability, gpu = _trt._device_capability(device), _trt._device_name(device)
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
