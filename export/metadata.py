"""``metadata.json`` beside every exported artefact: what it is, what it takes and gives, where it came from.

Keys: ``format``, ``artefact``, ``artefact_sha256``, ``model_sha256`` (the source checkpoint),
``class_names``, ``grade_class_names`` (the grade names of each named grading task, keyed by its
output suffix: ``{"xray": ["class_0", "class_1"]}`` for ``grade_probs_xray``; empty without named
grading tasks; older artefacts lack the key and their records give those grades as indices),
``masks`` (per ``defect_masks`` output of a segmentation task: its foreground
``class_names``, ``structure_classes`` and ``stride`` in training-size pixels), ``inputs`` / ``outputs`` (name, dtype, shape with ``"N"`` for the dynamic batch,
kind), ``dynamic_axes``, ``batch_sizes``, ``preprocessing`` (input size, training size, resize,
normalisation constants, test-time views), ``training_config``, ``versions`` (lineside, torch,
onnx, onnxruntime …) and format-specific entries (``opset``, ``precision``, ``tensorrt`` …).

Lookup for an artefact ``X``: ``X.json`` beside it (``model.qdq.onnx.json``), else the folder's
``metadata.json``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from importlib import metadata as _im
from pathlib import Path
from typing import Any

__all__ = ["MetadataError", "build_metadata", "file_sha256", "metadata_path", "read_metadata", "write_metadata", "package_versions"]


class MetadataError(RuntimeError):
    """A metadata file is missing or does not describe the artefact."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(*extra: str) -> dict[str, str]:
    names = ("lineside", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxslim", *extra)
    out = {}
    for n in names:
        try:
            out[n] = _im.version(n)
        except _im.PackageNotFoundError:
            continue
    return out


def build_metadata(deployable: Any, loaded: Any, fmt: str, **extra: Any) -> dict:
    """Metadata of a :class:`export.deployable.DeployableModel` built from ``loaded`` (a LoadedModel)."""
    encoders = [m for m in deployable.modules() if hasattr(m, "scale") and hasattr(m, "shift") and hasattr(m, "input_norm")]
    norm = {}
    if encoders:
        enc = encoders[0]
        norm = {"input_norm": enc.input_norm, "scale": enc.scale.flatten().tolist(), "shift": enc.shift.flatten().tolist(),
                "formula": "x * scale + shift, x in 0..255 (inside the graph)"}
    outputs = [s.to_dict() for s in deployable.output_specs()]
    inputs = [s.to_dict() for s in (deployable.input_specs() if hasattr(deployable, "input_specs") else [deployable.input_spec()])]
    source = getattr(loaded, "source", "") or ""
    meta = {
        "format": fmt,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_sha256": file_sha256(source) if source and os.path.isfile(source) else None,
        "source_checkpoint": os.path.abspath(source) if source else None,
        "task": "+".join(getattr(loaded, "tasks", None) or ["grading"]),
        "class_names": list(deployable.class_names),
        "box_class_names": list(getattr(loaded, "box_class_names", None) or []),
        "grade_class_names": {str(q): list(n) for q, n in (getattr(loaded, "grade_class_names", None) or {}).items()},
        "masks": _mask_outputs(deployable),
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {s["name"]: {"0": "N"} for s in [*inputs, *outputs]},
        "preprocessing": {
            "input": "uint8 (N, C, H, W) frames, decoded outside, everything after inside the model",
            "input_size": list(deployable.input_size),
            "train_size": list(deployable.train_size),
            "channels": deployable.channels,
            "resize": "bilinear, half-pixel centres, no antialias, 11-bit fixed point rounded to uint8 (bit-exact to OpenCV "
            "INTER_LINEAR on uint8), integer arithmetic inside the graph; frames of another size are resized to input_size "
            "on the host by the same function (lineside.vision.preprocess.resize_uint8)",
            "normalisation": norm,
            "tta_views": deployable.tta_views,
            "text_prompt": getattr(deployable, "text_prompt", None),
        },
        "training_config": getattr(loaded, "training_config", {}) or {"model": getattr(loaded, "config", {})},
        "versions": package_versions(),
    }
    points = _points_preprocessing(deployable, loaded)
    if points is not None:
        meta["points"] = points
    meta.update(extra)
    return meta


def _mask_outputs(deployable: Any) -> dict:
    """``{output name: {"class_names", "structure_classes", "stride"}}`` of each segmentation decoder
    (its ``defect_masks`` channel k = mask value k + 1; structure classes weigh 0 in the defect heatmap)."""
    out = {}
    for decoder in getattr(deployable, "decoders", {}).values():
        weight = getattr(decoder, "defect_weight", None)
        if weight is None or not hasattr(decoder, "class_names") or not hasattr(decoder, "stride"):
            continue
        w = weight.flatten().tolist()[1:]
        out["defect_masks" + decoder.suffix] = {
            "class_names": list(decoder.class_names),
            "structure_classes": [n for n, v in zip(decoder.class_names, w) if v == 0],
            "stride": int(decoder.stride),
        }
    return out


def _points_preprocessing(deployable: Any, loaded: Any) -> dict | None:
    """How clouds are prepared for a model with a point encoder (host side, then inside the graph); None otherwise."""
    if getattr(deployable, "num_points", None) is None:
        return None
    from lineside.export.point_inputs import PointPreprocessing

    prep = PointPreprocessing.from_loaded(loaded, deployable)
    return {
        **prep.to_dict(),
        "host": "read (.ply/.pcd/.xyz/.npy, or depth image + intrinsics) → drop NaN/inf → [crop to workspace] → statistical "
                "outlier removal → voxel downsample → normals (oriented toward the sensor at the origin) → sample or zero-pad "
                "to num_points (lineside.export.point_inputs)",
        "graph": "center = centroid of the real points, scale = largest distance from it; normalized = (points - center) / "
                 "scale inside the graph; grasp outputs go back to sensor metres inside the graph",
        "top_k": deployable.grasp_decoder.top_k if deployable.grasp_decoder is not None else None,
        "nms_radius_m": deployable.grasp_decoder.nms_radius if deployable.grasp_decoder is not None else None,
    }


def metadata_path(artefact: str | os.PathLike) -> Path:
    """Where the metadata of ``artefact`` lives (see module docstring); the first candidate if none exists."""
    p = Path(artefact)
    if p.is_dir():
        return p / "metadata.json"
    own = p.with_name(p.name + ".json")
    if own.is_file():
        return own
    return p.parent / "metadata.json"


def write_metadata(meta: dict, artefact: str | os.PathLike, own_file: bool = False) -> Path:
    """Write ``meta`` (with the artefact's name and hash) beside ``artefact``; atomic."""
    p = Path(artefact)
    meta = dict(meta, artefact=p.name, artefact_sha256=file_sha256(p) if p.is_file() else None)
    target = p.with_name(p.name + ".json") if own_file else p.parent / "metadata.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_metadata(artefact: str | os.PathLike, required: bool = True) -> dict:
    """The metadata of ``artefact`` (a file or an export folder)."""
    path = metadata_path(artefact)
    if not path.is_file():
        if required:
            raise MetadataError(f"{artefact}: no metadata beside it (looked for {path}); export with `lineside export ...`")
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path}: unreadable metadata ({exc})") from exc
    name = meta.get("artefact")
    if name and Path(artefact).is_file() and name != Path(artefact).name and path.name == "metadata.json":
        own = Path(artefact)
        raise MetadataError(f"{path} describes {name}, not {own.name}; give {own.name} its own {own.name}.json")
    return meta
