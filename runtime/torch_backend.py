"""Eager PyTorch backend: the deployable module of a checkpoint, in-process (CPU or CUDA)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from lineside.runtime.backend import Backend, BackendError

__all__ = ["TorchBackend"]


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
        trust_checkpoint: load a checkpoint that a weights-only load refuses as a full pickle
            (``--trust-checkpoint``; only for a file from a trusted source).
    """

    name = "torch"
    reads_checkpoints = True

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
        trust_checkpoint: bool = False,
    ) -> None:
        import torch

        from lineside.export.checkpoint import load_inspection_model
        from lineside.export.deployable import build_deployable
        from lineside.export.metadata import build_metadata

        super().__init__(path or getattr(loaded, "source", "") or "<memory>", device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("device cuda was asked for but no CUDA GPU is available; use cpu")
        if deployable is None:
            loaded = load_inspection_model(path, trust_checkpoint=trust_checkpoint)
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
