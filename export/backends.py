"""Backends: one small interface over every way to run a deployable model.

    backend = load_backend("export/model.onnx")          # by suffix: .ckpt .onnx .pt2 .engine/.plan
    out = backend(frames_uint8_nchw)                      # {"grade_probs": (N, K) float32, "grade": (N,) int64}

Each backend loads an artefact, takes named NumPy arrays in (``image`` uint8 (N, C, H, W) at
its ``input_size``; a point model: a dict of ``points`` float32 (N, P, 3), ``point_mask`` bool
(N, P) [, ``point_normals``], see :mod:`export.point_inputs`) and gives named NumPy arrays out,
listed in its ``metadata``. ``score``,
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
    def input_specs(self) -> list[dict]:
        return list(self.metadata.get("inputs") or [])

    def _input(self, name: str) -> dict:
        for spec in self.input_specs:
            if spec["name"] == name:
                return spec
        raise BackendError(f"{self.describe()}: the model takes no {name!r} input (it takes {[s['name'] for s in self.input_specs]})")

    @property
    def takes_points(self) -> bool:
        """The model takes point clouds (``points`` + ``point_mask``)."""
        return any(s["name"] == "points" for s in self.input_specs)

    @property
    def takes_image(self) -> bool:
        return any(s["name"] == "image" for s in self.input_specs) or not self.input_specs

    @property
    def num_points(self) -> int:
        """P, the points per cloud of a point model."""
        return int(self._input("points")["shape"][1])

    @property
    def input_size(self) -> tuple[int, int]:
        shape = self._input("image")["shape"] if self.takes_points else self.metadata["inputs"][0]["shape"]
        return int(shape[2]), int(shape[3])

    @property
    def channels(self) -> int:
        return int((self._input("image") if self.takes_points else self.metadata["inputs"][0])["shape"][1])

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
    def __call__(self, image: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(image, dict) or self.takes_points:
            return self._call_named(image if isinstance(image, dict) else {"image": image})
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

    def _call_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (every input of the metadata, batch first), checked against the specs, then run."""
        specs = self.input_specs
        names = [s["name"] for s in specs]
        if set(inputs) != set(names):
            raise BackendError(f"{self.describe()}: takes inputs {names}, got {sorted(inputs)}")
        arrays, n = {}, None
        for spec in specs:
            a = np.ascontiguousarray(inputs[spec["name"]])
            want = tuple(spec["shape"][1:])
            if str(a.dtype) != spec["dtype"] or a.shape[1:] != want:
                raise BackendError(f"{self.describe()}: input {spec['name']!r} must be {spec['dtype']} (N, {', '.join(map(str, want))}), "
                                   f"got {a.dtype} {a.shape}" + ("; prepare clouds with lineside.export.point_inputs" if spec["name"] != "image" else ""))
            if n is not None and len(a) != n:
                raise BackendError(f"{self.describe()}: inputs differ in batch size ({n} vs {len(a)} for {spec['name']!r})")
            n = len(a)
            arrays[spec["name"]] = a
        limit = self.max_batch
        if limit and n > limit:
            parts = [self._run_named({k: v[i : i + limit] for k, v in arrays.items()}) for i in range(0, n, limit)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run_named(arrays)

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Several named inputs (a point model); backends that run them override this."""
        if list(inputs) == ["image"]:
            return self._run(inputs["image"])
        raise BackendError(f"{self.describe()}: the {self.name} backend runs image-only models; "
                           "use the ONNX graph (onnxruntime), a checkpoint (torch) or a TensorRT engine")

    def warmup(self, batch_size: int = 1, rounds: int = 2) -> None:
        x = self.blank_inputs(batch_size)
        for _ in range(rounds):
            self(x)

    def blank_inputs(self, batch_size: int = 1) -> np.ndarray | dict[str, np.ndarray]:
        """A batch to warm up with: black frames, or for a point model a small random cloud (all points real)."""
        if not self.takes_points:
            return np.zeros((batch_size, self.channels, *self.input_size), dtype=np.uint8)
        rng = np.random.default_rng(0)
        out: dict[str, np.ndarray] = {}
        for spec in self.input_specs:
            shape = (batch_size, *(int(d) for d in spec["shape"][1:]))
            if spec["name"] == "image":
                out["image"] = np.zeros(shape, np.uint8)
            elif spec["name"] == "point_mask":
                out["point_mask"] = np.ones(shape, bool)
            elif spec["name"] == "point_normals":
                v = rng.normal(size=shape)
                out["point_normals"] = (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
            else:  # points: a 5 cm cloud 0.4 m in front of the sensor
                out[spec["name"]] = (rng.uniform(-0.025, 0.025, shape) + np.array([0.0, 0.0, 0.4])).astype(np.float32)
        return out

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
        return self._run_named({"image": image})

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        xs = [torch.from_numpy(inputs[n]).to(self.device, non_blocking=True) for n in self.deployable.input_names]
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(xs[0].device.type, dtype=self.autocast):
                    outs = self._fn(*xs)
            else:
                outs = self._fn(*xs)
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

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
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
