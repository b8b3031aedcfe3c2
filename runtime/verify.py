"""Parity of a built artefact, run here: the artefact's backend against its reference on real inputs.

``export`` builds artefacts and knows what to compare (:mod:`lineside.export.parity`); running them
needs the backends, which live here, above it. The ``lineside export`` commands pass
:func:`verify_artefact` to the builders as ``verify=``::

    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.verify import verify_artefact
    result = export_onnx("best.ckpt", "export/", verify=verify_artefact)   # result.parity: ParityReport
"""

from __future__ import annotations

import os

import numpy as np

from lineside.export.parity import ParityReference, ParityReport, Tolerance, check_parity
from lineside.runtime.backend import Backend, load_backend

__all__ = ["verify_artefact", "reference_backend"]


def reference_backend(reference: ParityReference, device: str = "cpu") -> Backend:
    """Eager torch on the reference's deployable module, or its artefact's own backend."""
    if reference.deployable is not None:
        from lineside.runtime.torch_backend import TorchBackend

        return TorchBackend(deployable=reference.deployable, loaded=reference.loaded, device=device)
    if reference.path is None:
        raise ValueError("a parity reference needs a deployable module or an artefact path")
    return load_backend(reference.path, device="cpu" if str(reference.path).endswith(".onnx") else device)


def verify_artefact(artefact: str | os.PathLike, reference: ParityReference, inputs: np.ndarray | dict[str, np.ndarray],
                    tolerance: Tolerance | str = "fp32", device: str = "cpu", batch_size: int = 8) -> ParityReport:
    """Run ``artefact`` (by its suffix: :func:`~lineside.runtime.backend.load_backend`) and its
    ``reference`` on ``inputs`` and compare every output (:func:`lineside.export.parity.check_parity`)
    at ``tolerance``: a precision name or a :class:`~lineside.export.parity.Tolerance` (builders pass
    :func:`~lineside.export.parity.tolerance_for` of their precision and ``--parity-tolerance``). Raises :class:`~lineside.runtime.backend.BackendError` (a ``RuntimeError``) when the artefact
    cannot run here."""
    candidate = load_backend(artefact, device=device)
    try:
        return check_parity(reference_backend(reference, device), candidate, inputs, tolerance, batch_size=batch_size)
    finally:
        candidate.close()
