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

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lineside.export.backends import Backend, BackendError
from lineside.export.metadata import MetadataError, read_metadata

__all__ = ["AotiBackend", "aoti_package", "export_aoti", "main", "EMBEDDED_METADATA_KEY"]

log = logging.getLogger("lineside.export")

EMBEDDED_METADATA_KEY = "lineside.metadata"  # metadata.json, also inside the package (aot_inductor.metadata)


def _device_index(device: str) -> int:
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


def _check_device(device: str) -> str:
    import torch

    kind = device.partition(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu or cuda[:N]")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendError("device cuda was asked for but no CUDA GPU is available here; export and run with --device cpu")
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
):
    """Export a checkpoint to ``out_dir/model.pt2`` + ``metadata.json`` and check parity on real images.

    Returns an :class:`export.onnx_export.ExportResult` (``ok`` False when parity failed; the
    files stay for inspection). ``parity_images=0`` skips the check.
    """
    import torch

    from lineside.export.backends import TorchBackend
    from lineside.export.checkpoint import LoadedModel, load_inspection_model
    from lineside.export.deployable import build_deployable, parse_size
    from lineside.export.metadata import build_metadata, write_metadata
    from lineside.export.onnx_export import ExportResult, parse_batch_sizes
    from lineside.export.parity import check_parity

    start = time.perf_counter()
    device = _check_device(device)
    sizes = parse_batch_sizes(batch_sizes)
    loaded = source if isinstance(source, LoadedModel) else load_inspection_model(source)
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
    if parity_images:
        from lineside.export.onnx_export import parity_inputs

        images = parity_inputs(deployable, loaded, calib, parity_images)  # frames, or real clouds for a point model
        n = len(next(iter(images.values()))) if isinstance(images, dict) else len(images)
        reference = TorchBackend(deployable=deployable, loaded=loaded, device=device)
        candidate = AotiBackend(path, device=device)
        result.parity = check_parity(reference, candidate, images, "fp32", batch_size=max(1, min(8, n)))
        meta["parity"] = result.parity.to_dict()
        write_metadata(meta, path)
    result.metadata = meta
    result.seconds = time.perf_counter() - start
    return result


class AotiBackend(Backend):
    """An AOTInductor ``model.pt2`` package, loaded with ``torch._inductor.aoti_load_package``.

    Needs torch (the version that compiled it) and nothing of the training code.

    Args:
        path: the ``.pt2`` file (its ``metadata.json`` beside it, else the copy inside the package).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lineside export aoti", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint from `lineside fit` or ensemble.ckpt from `lineside crossval`")
    ap.add_argument("--out", required=True, help="output folder: model.pt2 + metadata.json")
    ap.add_argument("--input-size", default=None, help="H or HxW of the frames the package takes (default: the training size)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the device the package is compiled for (and only runs on)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to serve; the largest bounds the dynamic batch (bigger calls are split)")
    ap.add_argument("--tta", type=int, default=None, choices=[1, 2, 4, 8], help="test-time views in the graph (default: as trained)")
    ap.add_argument("--calib", default=None, help="folder / glob / CSV of your own images for the parity check (default: ELPV cells)")
    ap.add_argument("--parity-images", type=int, default=32)
    ap.add_argument("--max-autotune", action="store_true", help="let Inductor benchmark kernel variants (GPU; compiles much longer)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU hosts
    from lineside.export.onnx_export import parse_batch_sizes

    configs = {"max_autotune": True} if a.max_autotune else None
    try:
        r = export_aoti(a.ckpt, a.out, a.input_size, parse_batch_sizes(a.batch_sizes), a.device, a.calib, a.parity_images, a.tta, configs)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lineside export aoti: error: {exc}", file=sys.stderr)
        return 1
    aoti = r.metadata["aoti"]
    size_mb = r.path.stat().st_size / 1e6
    print(f"wrote {r.path} ({size_mb:.1f} MB, {aoti['device']}, batch 1..{aoti['max_batch']}) and {r.path.parent / 'metadata.json'} "
          f"in {r.seconds:.1f} s (compile {aoti['compile_seconds']:.1f} s)")
    print("inputs:  " + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in r.metadata["inputs"]))
    print("outputs: " + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in r.metadata["outputs"]))
    if r.parity is not None:
        print(r.parity.table())
        (r.path.parent / "parity.json").write_text(json.dumps(r.parity.to_dict(), indent=2) + "\n")
        if not r.parity.ok:
            print("lineside export aoti: parity FAILED: the compiled package disagrees with the trained model", file=sys.stderr)
            return 1
    return 0
