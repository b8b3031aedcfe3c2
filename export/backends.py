"""Backends: one small interface over every way to run a deployable model.

    backend = load_backend("export/model.onnx")          # by suffix: .ckpt .onnx .pt2 .engine/.plan
    out = backend(frames_uint8_nchw)                      # {"grade_probs": (N, K) float32, "grade": (N,) int64}

Each backend loads an artefact, takes named NumPy arrays in (``image`` uint8 (N, C, H, W) at
its ``input_size``) and gives named NumPy arrays out, listed in its ``metadata``. ``score``,
``station`` and ``bench`` talk only to this interface; formats register in :data:`BACKENDS`
(one class per backend, imported lazily so a station without Lightning or TensorRT still loads).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Backend", "BackendError", "TorchBackend", "OnnxRuntimeBackend", "BACKENDS", "SUFFIXES", "load_backend", "backend_for"]


class BackendError(RuntimeError):
    """An artefact cannot be run by the asked backend here (missing runtime, wrong file, mismatch)."""


class Backend:
    """Base class: subclasses set ``metadata`` and implement :meth:`_run`.

    Attributes:
        name: short backend name (``torch``, ``onnxruntime``, ``aoti``, ``tensorrt``).
        path: the artefact.
        metadata: the artefact's metadata (see :mod:`export.metadata`).
    """

    name = "base"

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        self.path = os.fspath(path)
        self.device = device
        self.metadata: dict = {}

    # -- what it takes and gives --------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        shape = self.metadata["inputs"][0]["shape"]
        return int(shape[2]), int(shape[3])

    @property
    def channels(self) -> int:
        return int(self.metadata["inputs"][0]["shape"][1])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names") or [])

    @property
    def output_specs(self) -> list[dict]:
        return list(self.metadata.get("outputs") or [])

    @property
    def output_names(self) -> list[str]:
        return [s["name"] for s in self.output_specs]

    @property
    def max_batch(self) -> int | None:
        sizes = self.metadata.get("batch_sizes")
        return max(sizes) if sizes and self.metadata.get("max_batch_enforced") else None

    def describe(self) -> str:
        return f"{self.name} ({Path(self.path).name})"

    # -- running ---------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 4:
            raise BackendError(f"{self.describe()}: expects uint8 (N, C, H, W) frames, got {image.dtype} {image.shape}")
        if image.shape[1:] != (self.channels, *self.input_size):
            raise BackendError(
                f"{self.describe()}: expects frames of shape (N, {self.channels}, {self.input_size[0]}, {self.input_size[1]}), "
                f"got {image.shape}; resize with lineside.vision.preprocess.frames_to_batch"
            )
        limit = self.max_batch
        if limit and len(image) > limit:
            parts = [self._run(image[i : i + limit]) for i in range(0, len(image), limit)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run(image)

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def warmup(self, batch_size: int = 1, rounds: int = 2) -> None:
        x = np.zeros((batch_size, self.channels, *self.input_size), dtype=np.uint8)
        for _ in range(rounds):
            self(x)

    def close(self) -> None:
        pass


class TorchBackend(Backend):
    """Eager PyTorch on the :class:`export.deployable.DeployableModel` of a checkpoint.

    Args:
        path: a ``train.py`` / ``crossval.py`` checkpoint, or None with ``deployable`` given.
        device: ``cpu`` or ``cuda[:N]``.
        input_size: (H, W) of the frames; default the training size.
        compile: wrap in ``torch.compile`` (first calls compile); a string is the compile mode
            (``"reduce-overhead"`` = CUDA graphs on a GPU, ``"max-autotune"``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` autocast on the device.
        deployable: an already built deployable model (with ``loaded`` for its metadata).
    """

    name = "torch"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str = "cpu",
        input_size: Sequence[int] | str | None = None,
        compile: bool | str = False,
        dtype: str = "float32",
        deployable: Any = None,
        loaded: Any = None,
        tta_views: int | None = None,
    ) -> None:
        import torch

        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.deployable import build_deployable
        from lineside.export.metadata import build_metadata

        super().__init__(path or getattr(loaded, "source", "") or "<memory>", device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("device cuda was asked for but no CUDA GPU is available; use cpu")
        if deployable is None:
            loaded = load_inspection_model(path)
            deployable = build_deployable(loaded, input_size, tta_views)
        self.deployable = deployable.to(device).eval()
        self.metadata = build_metadata(deployable, loaded, "torch")
        self.autocast = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        self.dtype = dtype
        mode = compile if isinstance(compile, str) else None
        self._fn = torch.compile(self.deployable, mode=mode) if compile else self.deployable
        if compile:
            self.name = "torch.compile" + (f"({mode})" if mode else "")
        if self.autocast is not None:
            self.name += f"-{dtype}"

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(image).to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(x.device.type, dtype=self.autocast):
                    outs = self._fn(x)
            else:
                outs = self._fn(x)
        return {n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for n, o in zip(self.deployable.output_names, outs)}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on an exported ``model.onnx`` (CPU, or CUDA when onnxruntime-gpu is installed).

    Args:
        path: the ``.onnx`` file (its metadata beside it).
        device: ``cpu`` or ``cuda[:N]``.
        threads: intra-op threads (0 = ONNX Runtime's default, all cores).
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0) -> None:
        import onnxruntime as ort

        from lineside.export.metadata import read_metadata

        super().__init__(path, device)
        if not os.path.isfile(self.path):
            raise BackendError(f"{self.path}: ONNX file not found")
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
        if read_metadata(self.path, required=False).get("precision") == "fp16" and not device.startswith("cuda"):
            disabled = ["NchwcTransformer"]  # ONNX Runtime 1.32's CPU NCHWc layout pass segfaults on fp16 EfficientNet graphs
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=providers, disabled_optimizers=disabled)
        except Exception as exc:  # noqa: BLE001 - ORT raises many kinds
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.metadata = read_metadata(self.path)
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


# backend name → "module:Class"; suffix → backend name
BACKENDS: dict[str, str] = {
    "torch": "lineside.export.backends:TorchBackend",
    "onnxruntime": "lineside.export.backends:OnnxRuntimeBackend",
    "aoti": "lineside.export.aoti:AotiBackend",
    "tensorrt": "lineside.export.tensorrt:TensorRTBackend",
}
SUFFIXES: dict[str, str] = {".ckpt": "torch", ".pt": "torch", ".onnx": "onnxruntime", ".pt2": "aoti", ".engine": "tensorrt", ".plan": "tensorrt"}


def backend_for(path: str | os.PathLike) -> str:
    """The backend name for an artefact path (a file by suffix, or an export folder by its metadata)."""
    p = Path(path)
    if p.is_dir():
        from lineside.export.metadata import read_metadata

        meta = read_metadata(p)
        p = p / meta["artefact"]
    name = SUFFIXES.get(p.suffix.lower())
    if name is None:
        raise BackendError(f"{path}: unknown model format {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return name


def load_backend(path: str | os.PathLike, backend: str | None = None, device: str = "cpu", **kwargs: Any) -> Backend:
    """Load ``path`` with ``backend`` (default: by its suffix). Extra kwargs go to the backend class."""
    p = Path(path)
    if p.is_dir():
        from lineside.export.metadata import read_metadata

        p = p / read_metadata(p)["artefact"]
    if not p.exists():
        raise BackendError(f"{p}: model file not found")
    name = backend or backend_for(p)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        klass = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not available here: {exc}") from exc
    return klass(p, device=device, **kwargs)
