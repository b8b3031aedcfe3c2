"""Open a model the same way in every command: ``score``, ``station`` and ``bench`` call :func:`open_model`.

A checkpoint on the CPU runs as a cached ONNX export in ONNX Runtime (parity-checked on real
images once, cached by the checkpoint's hash; 2.1-2.4x faster end to end than eager torch on
2 CPU cores), falling back to eager torch with a warning when the export is impossible here;
on a GPU a checkpoint runs in eager torch; an exported artefact (``.onnx``, ``.pt2``,
``.engine``, an export folder) runs on the backend its suffix names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from typing import TYPE_CHECKING

from lineside.runtime.backend import Backend, BackendError, load_backend
from lineside.vision.io import InputError

if TYPE_CHECKING:  # a station on an exported artefact never imports the model code
    from lineside.export.checkpoint import LoadedModel

__all__ = ["open_model", "model_cache_dir"]

log = logging.getLogger("lineside.runtime")


def model_cache_dir() -> Path:
    """Where exports made for scoring are cached: ``$LINESIDE_CACHE`` or ``~/.cache/lineside``."""
    return Path(os.environ.get("LINESIDE_CACHE") or Path.home() / ".cache" / "lineside")


def _cached_onnx(loaded: LoadedModel, input_size: tuple[int, int] | None, tta_views: int | None, text: str | None = None) -> Path:
    """The checkpoint exported once to ONNX (parity-checked on real images), cached by checkpoint hash."""
    from lineside.export.metadata import file_sha256
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.verify import verify_artefact

    size = input_size or (loaded.image_size, loaded.image_size)
    views = loaded.tta_views if tta_views is None else tta_views
    # -o3: exports since the in-graph resize is the integer one of every path (older cached graphs
    # resize in float; -o2 added grade_heatmap and box kinds)
    key = f"{file_sha256(loaded.source)[:16]}-{size[0]}x{size[1]}-tta{views}-o3"
    if getattr(loaded, "grade_class_names", None):  # named grading tasks: graphs cached before their metadata named the grades
        key += "-gn"
    if getattr(loaded, "adapter", ""):  # base + LoRA adapter: one cached graph per adapter
        key += "-lora" + file_sha256(loaded.adapter)[:12]
    if text and getattr(loaded.model, "text_encoder", None) is not None:
        import hashlib

        key += "-text" + hashlib.sha256(text.encode()).hexdigest()[:8]
    folder = model_cache_dir() / "onnx" / key
    path = folder / "model.onnx"
    if path.is_file() and (folder / "metadata.json").is_file():
        return path
    log.info("exporting %s to ONNX once (cached in %s) ...", loaded.source, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    result = export_onnx(loaded, tmp, size, tta_views=views, parity_images=16, text_prompt=text, verify=verify_artefact)
    if not result.ok:
        raise BackendError(f"ONNX export of {loaded.source} failed its parity check:\n{result.parity.table()}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return path


def _adapter_base(adapter: str | os.PathLike) -> str:
    """The base checkpoint recorded in an adapter's ``.json`` sidecar."""
    import json

    record = Path(adapter).with_suffix(".json")
    try:
        base = Path(json.loads(record.read_text())["base"])
        # as recorded (relative to where the fit ran), else relative to the adapter's folder, else its file name there
        return str(next((p for p in (base, record.parent / base, record.parent / base.name) if p.is_file()), base))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{adapter}: no base checkpoint recorded in {record} ({exc}); pass --model BASE.ckpt --adapter {adapter}") from exc


def open_model(
    model: str | os.PathLike | LoadedModel | Backend,
    backend: str = "auto",
    device: str = "cpu",
    input_size: str | tuple[int, int] | None = None,
    tta_views: int | None = None,
    text: str | None = None,
    trust_checkpoint: bool = False,
    adapter: str | os.PathLike | None = None,
) -> Backend:
    """A :class:`export.backends.Backend` for a checkpoint, a loaded model or an exported artefact.

    ``backend="auto"``: a checkpoint on the CPU runs as a cached ONNX export in ONNX Runtime
    (falling back to eager torch, with a warning, when the export is impossible here); on a
    GPU, eager torch; an exported artefact runs on the backend its suffix names.
    A checkpoint is read with ``weights_only=True``; ``trust_checkpoint`` (``--trust-checkpoint``)
    lets one that this refuses load as a full pickle. ``adapter``: a LoRA adapter file
    (``adapter.safetensors``) merged into the checkpoint's weights; ``model`` may also be the adapter
    file itself, whose record names its base checkpoint. A grasp ranker file (``GraspRanker.save``,
    recognised by its content) runs as a :class:`~lineside.runtime.ranker_backend.RankerBackend`.
    """
    if isinstance(model, Backend):
        return model
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model) and not str(model).lower().endswith((".onnx", ".pt2", ".engine", ".plan")):
        from lineside.fusion.grasp_ranker import is_ranker_file  # a station on an exported artefact skips this import

        if is_ranker_file(model):  # a grasp ranker file (GraspRanker.save), recognised by its content
            if input_size or tta_views or text or adapter or backend not in ("auto", "torch"):
                raise InputError(f"{model}: a grasp ranker file runs as it is; --input-size, --tta, --text, --adapter and "
                                 f"--backend {backend} do not apply")
            from lineside.runtime.ranker_backend import RankerBackend

            return RankerBackend(model, device)
    from lineside.export.checkpoint import LoadedModel, load_inspection_model
    from lineside.export.deployable import build_deployable, parse_size
    from lineside.runtime.torch_backend import TorchBackend

    size = parse_size(input_size) if isinstance(input_size, (str, int)) else input_size
    if str(model).lower().endswith(".safetensors"):  # an adapter: base + adapter
        model, adapter = _adapter_base(model), model
    if adapter and (isinstance(model, LoadedModel) or not str(model).lower().endswith((".ckpt", ".pt"))):
        raise InputError(f"--adapter {adapter}: an adapter is merged into a checkpoint (.ckpt), not into {model}")
    is_ckpt = isinstance(model, LoadedModel) or str(model).lower().endswith((".ckpt", ".pt"))
    if not is_ckpt:
        if input_size or tta_views or text:
            raise InputError(f"{model}: --input-size, --tta and --text are fixed in an exported artefact; re-export to change them")
        return load_backend(model, None if backend == "auto" else backend, device, trust_checkpoint=trust_checkpoint)
    loaded = model if isinstance(model, LoadedModel) else load_inspection_model(model, trust_checkpoint=trust_checkpoint,
                                                                                adapter=adapter)
    if backend == "auto" and device == "cpu" and loaded.source:
        try:
            return load_backend(_cached_onnx(loaded, size, tta_views, text), "onnxruntime", device)
        except Exception as exc:  # noqa: BLE001 - any export trouble: the eager model still scores correctly
            log.warning("ONNX Runtime path unavailable (%s); scoring with eager torch", str(exc).splitlines()[0])
    if backend not in ("auto", "torch"):
        raise InputError(f"backend {backend!r} takes an exported artefact; export the checkpoint first (lineside export ...)")
    return TorchBackend(deployable=build_deployable(loaded, size, tta_views, text), loaded=loaded, device=device)
