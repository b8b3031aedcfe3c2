"""Backend: one small interface over every way to run a deployable model.

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
from typing import Any

import numpy as np

__all__ = ["Backend", "BackendError", "BACKENDS", "SUFFIXES", "load_backend", "backend_for", "check_artefact_sha256"]


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
    reads_checkpoints = False  # True: loads a pickled checkpoint, and takes ``trust_checkpoint``

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


# backend name → "module:Class"; suffix → backend name
BACKENDS: dict[str, str] = {
    "torch": "lineside.runtime.torch_backend:TorchBackend",
    "onnxruntime": "lineside.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "aoti": "lineside.runtime.aoti_backend:AotiBackend",
    "tensorrt": "lineside.runtime.tensorrt_backend:TensorRTBackend",
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


def check_artefact_sha256(path: str | os.PathLike, metadata: dict) -> None:
    """Refuse an exported artefact whose bytes are not those its metadata describes.

    ``metadata["artefact_sha256"]`` is written by the exporter beside every artefact; a file edited,
    truncated or swapped after export (or a metadata.json of another export) fails here, before the
    file is handed to a runtime. Metadata without a recorded hash (embedded only) is not checked.
    """
    want = metadata.get("artefact_sha256")
    if not want:
        return
    from lineside.export.metadata import file_sha256, metadata_path

    got = file_sha256(path)
    if got != want:
        raise BackendError(
            f"{path}: sha256 mismatch: the file's sha256 is {got[:16]}…, its metadata ({metadata_path(path)}) records "
            f"{want[:16]}… for {metadata.get('artefact') or Path(path).name}; the file changed after export or the two come "
            "from different exports. Re-export it (lineside export ...), or copy the artefact and its metadata together."
        )


def load_backend(path: str | os.PathLike, backend: str | None = None, device: str = "cpu", trust_checkpoint: bool = False,
                 **kwargs: Any) -> Backend:
    """Load ``path`` with ``backend`` (default: by its suffix). Extra kwargs go to the backend class.

    ``trust_checkpoint`` reaches the backends that read pickled checkpoints (``reads_checkpoints``):
    one that a weights-only load refuses is then loaded as a full pickle (``--trust-checkpoint``).
    """
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
    if klass.reads_checkpoints:
        kwargs["trust_checkpoint"] = trust_checkpoint
    return klass(p, device=device, **kwargs)
