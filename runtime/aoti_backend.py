"""AOTInductor backend: a ``model.pt2`` package, run without the training code."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from lineside.export.aoti import EMBEDDED_METADATA_KEY, _device_index
from lineside.export.metadata import MetadataError, read_metadata
from lineside.runtime.backend import Backend, BackendError, check_artefact_sha256

__all__ = ["AotiBackend"]

log = logging.getLogger("lineside.runtime")

class AotiBackend(Backend):
    """An AOTInductor ``model.pt2`` package, loaded with ``torch._inductor.aoti_load_package``.

    Needs torch (the version that compiled it) and nothing of the training code.

    Args:
        path: the ``.pt2`` file (its ``metadata.json`` beside it, whose sha256 the file must have; else the
            copy inside the package).
        device: ``cpu`` or ``cuda[:N]``; must be the kind of device the package was compiled for.
        single_threaded: run without the package's internal thread pool (one runner per caller thread).
    """

    name = "aoti"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", single_threaded: bool = False) -> None:
        import torch

        super().__init__(path, device)
        if not os.path.isfile(self.path):
            raise BackendError(f"{self.path}: AOTInductor package not found")
        try:
            self.metadata = read_metadata(self.path, required=False)
        except MetadataError:
            self.metadata = {}
        check_artefact_sha256(self.path, self.metadata)  # before the package's compiled code is loaded
        compiled_for = ((self.metadata.get("aoti") or {}).get("device")) if self.metadata else None
        kind = device.partition(":")[0]
        if compiled_for and compiled_for != kind:
            raise BackendError(f"{self.path}: compiled for {compiled_for}, cannot run on {device}; "
                               f"load it with device={compiled_for!r} or export again with --device {kind}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendError("device cuda was asked for but no CUDA GPU is available here")
        if kind == "cpu":  # torch's "No CUDA runtime is found" notice on CPU-only stations
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            self.model = torch._inductor.aoti_load_package(
                self.path, run_single_threaded=single_threaded, device_index=_device_index(device) if kind == "cuda" else -1
            )
        except Exception as exc:  # noqa: BLE001 - the loader raises RuntimeError and friends
            raise BackendError(f"{self.path}: AOTInductor cannot load it ({str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__})") from exc
        if not self.metadata:
            embedded = self.model.get_metadata().get(EMBEDDED_METADATA_KEY)
            if not embedded:
                raise BackendError(f"{self.path}: no metadata.json beside it and none inside; export with `lineside export aoti`")
            self.metadata = json.loads(embedded)
        built_with = (self.metadata.get("versions") or {}).get("torch")
        if built_with and built_with.split("+")[0] != torch.__version__.split("+")[0]:
            log.warning("%s was compiled with torch %s, this is torch %s: AOTInductor packages need the same version",
                        self.path, built_with, torch.__version__)
        self._torch_device = torch.device(device)

    def describe(self) -> str:
        return f"aoti-{self.device.partition(':')[0]} ({Path(self.path).name})"

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self._run_named({"image": image})

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        names = [s["name"] for s in self.input_specs] or ["image"]
        xs = [torch.from_numpy(inputs[n]).to(self._torch_device, non_blocking=True) for n in names]
        with torch.inference_mode():
            outs = self.model(*xs)
        if isinstance(outs, torch.Tensor):
            outs = [outs]
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outs)}
