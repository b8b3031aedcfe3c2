"""AOTInductor export: a compiled ``model.pt2`` package that runs without the training code.

    lineside export aoti --ckpt runs/quickstart/checkpoints/best.ckpt --out export/aoti
    lineside export aoti --ckpt best.ckpt --out export/aoti-gpu --device cuda --batch-sizes 1,8,32

The :class:`export.deployable.DeployableModel` (uint8 frames in, resize, normalisation and
decoders inside) is captured with ``torch.export`` with a dynamic batch ``N`` (1 to the
largest of ``--batch-sizes``), compiled ahead of time by Inductor into a shared library and
packaged as ``model.pt2`` beside ``metadata.json`` (also embedded in the package). A station
loads it with :class:`AotiBackend` (``load_backend("export/aoti")``): torch and the package,
no Lightning, no timm, no model classes. The package holds machine code for the device given
at export (``cpu``: the exporting CPU's vector ISA; ``cuda``: its GPU architecture) and needs
the same torch version to load: compile on the station's hardware class. After every export
the package is run on real images against the eager model (ELPV cells, or ``--calib DIR``);
a failing parity check exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence



__all__ = ["AotiError", "aoti_package", "export_aoti", "EMBEDDED_METADATA_KEY"]

log = logging.getLogger("lineside.export")

EMBEDDED_METADATA_KEY = "lineside.metadata"  # metadata.json, also inside the package (aot_inductor.metadata)


class AotiError(RuntimeError):
    """An AOTInductor package cannot be built here (no such device)."""


def _device_index(device: str) -> int:
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


def _check_device(device: str) -> str:
    import torch

    kind = device.partition(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu or cuda[:N]")
    if kind == "cuda" and not torch.cuda.is_available():
        raise AotiError("device cuda was asked for but no CUDA GPU is available here; export and run with --device cpu")
    return device


def aoti_package(
    deployable: Any,
    path: str | os.PathLike,
    device: str = "cpu",
    max_batch: int = 32,
    metadata: dict | None = None,
    inductor_configs: dict | None = None,
) -> Path:
    """``torch.export`` + AOTInductor: compile ``deployable`` for ``device`` into the package ``path``.

    Args:
        deployable: a :class:`export.deployable.DeployableModel` (eval mode).
        path: the ``.pt2`` file to write.
        device: ``cpu`` or ``cuda[:N]``; the package runs on that kind of device only.
        max_batch: upper bound of the dynamic batch axis ``N`` (lower bound 1).
        metadata: embedded in the package under :data:`EMBEDDED_METADATA_KEY` (JSON).
        inductor_configs: extra ``torch._inductor`` options (e.g. ``{"max_autotune": True}`` on a GPU).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lineside.export.onnx_export import example_inputs

    module = deployable.to(device).eval()
    upper = max(2, int(max_batch))
    example = tuple(t.to(device) for t in example_inputs(deployable))  # in input_specs order (forward takes them positionally)
    batch = torch.export.Dim("N", min=1, max=upper)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=(tuple({0: batch} for _ in example),), strict=False)
    configs = {"max_autotune": False, **(inductor_configs or {})}
    if metadata is not None:
        configs["aot_inductor.metadata"] = {EMBEDDED_METADATA_KEY: json.dumps(metadata, default=str)}
    tmp = path.with_name(path.stem + ".partial.pt2")  # the packager wants a .pt2 name
    out = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
    os.replace(out, path)
    return path


def export_aoti(
    source: Any,
    out_dir: str | os.PathLike,
    input_size: Sequence[int] | str | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    device: str = "cpu",
    calib: str | os.PathLike | None = None,
    parity_images: int = 32,
    tta_views: int | None = None,
    inductor_configs: dict | None = None,
    verify=None,
    trust_checkpoint: bool = False,
    tolerance=None,
):
    """Export a checkpoint to ``out_dir/model.pt2`` + ``metadata.json`` and check parity on real images.

    Returns an :class:`export.onnx_export.ExportResult` (``ok`` False when parity failed; the
    files stay for inspection). ``parity_images=0`` skips the check.
    ``trust_checkpoint``: see :func:`export.checkpoint.load_inspection_model`. ``tolerance``: parity
    overrides on the fp32 limits (:func:`export.parity.tolerance_for`).
    """
    import torch

    from lineside.export.checkpoint import LoadedModel, load_inspection_model
    from lineside.export.deployable import build_deployable, parse_size
    from lineside.export.metadata import build_metadata, write_metadata
    from lineside.export.onnx_export import ExportResult, parse_batch_sizes
    from lineside.export.parity import ParityReference, tolerance_for

    start = time.perf_counter()
    device = _check_device(device)
    sizes = parse_batch_sizes(batch_sizes)
    loaded = source if isinstance(source, LoadedModel) else load_inspection_model(source, trust_checkpoint=trust_checkpoint)
    deployable = build_deployable(loaded, parse_size(input_size) if isinstance(input_size, str) else input_size, tta_views)
    out = Path(out_dir)
    path = out / "model.pt2"
    aoti = {"device": device.partition(":")[0], "max_batch": max(2, max(sizes)), "inductor_configs": dict(inductor_configs or {})}
    meta = build_metadata(
        deployable, loaded, "aoti", precision="fp32", batch_sizes=sizes, max_batch_enforced=True, aoti=aoti,
        exporter=f"torch.export + AOTInductor (aoti_compile_and_package), torch {torch.__version__}",
    )
    compile_start = time.perf_counter()
    aoti_package(deployable, path, device, aoti["max_batch"], meta, inductor_configs)
    aoti["compile_seconds"] = round(time.perf_counter() - compile_start, 1)
    write_metadata(meta, path)
    result = ExportResult(path, meta)
    if parity_images and verify is not None:
        from lineside.export.onnx_export import parity_inputs

        images = parity_inputs(deployable, loaded, calib, parity_images)  # frames, or real clouds for a point model
        n = len(next(iter(images.values()))) if isinstance(images, dict) else len(images)
        result.parity = verify(path, ParityReference(deployable, loaded), images, tolerance_for("fp32", tolerance), device=device, batch_size=max(1, min(8, n)))
        meta["parity"] = result.parity.to_dict()
        write_metadata(meta, path)
    result.metadata = meta
    result.seconds = time.perf_counter() - start
    return result
