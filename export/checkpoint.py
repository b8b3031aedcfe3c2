"""Checkpoint → pure ``nn.Module`` and its metadata, without importing Lightning."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lineside.fusion.checkpoint_file import CheckpointError, read_checkpoint

__all__ = ["CheckpointError", "LoadedModel", "instantiate_config", "load_inspection_model", "named_grade_class_names"]


@dataclass
class LoadedModel:
    """A model ready for inference and what is needed to feed it.

    Attributes:
        model: the pure ``InspectionModel`` (or ``InspectionEnsemble``) in eval mode.
        class_names: grade names, index = grade.
        image_size: square input side used in training (resize target).
        channels: 1 (grayscale) or 3 (RGB).
        tta_views: dihedral test-time views used in evaluation.
        config: the model's ``class_path``/``init_args`` config.
        source: the checkpoint file it came from.
        training_config: the run's hyperparameters (model and data sections) as recorded.
        box_class_names: defect (box) class names of a model with a localization head, index = box label.
        tasks: the tasks the model has heads for (``grading``, ``localization`` …).
        points: a model with a point encoder: how its clouds were prepared in training
            (``num_points``, ``features``, ``voxel_size``, ``normal_radius``, ``normalisation`` …,
            recorded under ``checkpoint["lineside"]["points"]``), with the grasp decoder's
            ``grasp_top_k`` / ``grasp_nms_radius``; empty otherwise.
        adapter: the LoRA adapter file merged into ``model``'s weights, if any.
        grade_class_names: the grade names of each named grading task (``grading/xray``), keyed by the
            qualifier of its outputs (``{"xray": ["class_0", "class_1"]}``; ``class_names_<q>`` in the
            checkpoint); empty for a model with the plain ``grading`` task only, or a checkpoint that
            recorded none.
    """

    model: nn.Module
    class_names: list[str]
    image_size: int
    channels: int
    tta_views: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    training_config: dict[str, Any] = field(default_factory=dict)
    box_class_names: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    points: dict[str, Any] = field(default_factory=dict)
    adapter: str = ""  # a LoRA adapter file merged into the weights (lineside.fusion.adapters)
    grade_class_names: dict[str, list[str]] = field(default_factory=dict)


# Before lineside 0.2 the folders installed as top-level modules (``fusion.InspectionModel``);
# checkpoints written then name those class paths, which resolve under ``lineside.`` now.
_LEGACY_PACKAGES = ("vision", "fusion", "export", "pointcloud")


def _import(path: str) -> Any:
    if path.split(".", 1)[0] in _LEGACY_PACKAGES:
        path = "lineside." + path
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"cannot import {path!r} named in the checkpoint config: {exc}") from exc


def instantiate_config(config: Any, offline_weights: bool = True) -> Any:
    """Recursively build objects from ``{"class_path": ..., "init_args": {...}}`` dicts.

    With ``offline_weights`` every ``pretrained`` flag is turned off and ``weights_path`` dropped:
    the checkpoint's own weights replace them, so a station needs neither.
    """
    if isinstance(config, dict) and "class_path" in config:
        args = {k: instantiate_config(v, offline_weights) for k, v in (config.get("init_args") or {}).items()}
        if offline_weights:
            if "pretrained" in args:
                args["pretrained"] = False
            if "weights_path" in args:
                args["weights_path"] = None
        return _import(config["class_path"])(**args)
    if isinstance(config, dict):
        return {k: instantiate_config(v, offline_weights) for k, v in config.items()}
    if isinstance(config, list):
        return [instantiate_config(v, offline_weights) for v in config]
    return config


def load_inspection_model(
    ckpt_path: str | os.PathLike, map_location: str | torch.device = "cpu", trust_checkpoint: bool = False,
    adapter: str | os.PathLike | None = None,
) -> LoadedModel:
    """Rebuild the trained model from a ``train.py`` checkpoint (an ``InspectionModel``) or a
    ``crossval.py`` ensemble checkpoint (an :class:`fusion.ensemble.InspectionEnsemble`).

    The file is read with ``weights_only=True`` (:func:`lineside.fusion.checkpoint_file.read_checkpoint`);
    one whose pickle asks for more is refused with a :class:`CheckpointError` unless
    ``trust_checkpoint`` (``--trust-checkpoint``) says it comes from a trusted source.
    ``adapter``: a LoRA adapter file (``adapter.safetensors`` of a ``--model.adapter`` fit) merged into
    the weights; refused when it was trained on another base. A pruned checkpoint (``lineside prune``)
    re-shapes the configured model to its saved weights.
    """
    ckpt_path = os.fspath(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, map_location, trust_checkpoint)
    meta = ckpt.get("lineside") if isinstance(ckpt, dict) else None
    if not meta or not meta.get("model_config"):
        raise CheckpointError(
            f"{ckpt_path}: no lineside model config inside; train with `python train.py fit --config ...` "
            "(the Lightning CLI records the model's class_path/init_args)"
        )
    ensemble = meta.get("ensemble")
    if ensemble:  # cross-validation members averaged, with decision offsets (crossval.py)
        from lineside.fusion.ensemble import InspectionEnsemble

        configs = ensemble.get("member_configs") or [meta["model_config"]] * int(ensemble["members"])
        members = [instantiate_config(c) for c in configs]
        model = InspectionEnsemble(members, ensemble.get("grade_bias"))
    else:
        model = instantiate_config(meta["model_config"])
    from lineside.fusion.adapters import model_state
    from lineside.fusion.pruning import fit_to_state

    state = model_state(ckpt, ckpt_path)  # an adapter fit's checkpoint: its LoRA layers merged
    if meta.get("pruned"):  # `lineside prune`: the channel counts of the saved weights
        fit_to_state(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the configured model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if adapter:  # one base, one adapter per product: merged into the weights (plain torch)
        from lineside.fusion.adapters import AdapterError, merge_adapter

        try:
            merge_adapter(model, adapter, ckpt_path)
        except AdapterError as exc:
            raise CheckpointError(str(exc)) from exc
    model.eval()
    tasks = list(meta.get("tasks") or getattr(model, "task_names", None) or ["grading"])
    return LoadedModel(
        model=model,
        class_names=list(meta["class_names"]),
        image_size=int(meta.get("image_size") or 224),
        channels=int(meta.get("channels") or 1),
        tta_views=int(meta.get("tta_views") or 1),
        config=meta["model_config"],
        source=ckpt_path,
        adapter=os.fspath(adapter) if adapter else "",
        training_config={
            "model": _plain(ckpt.get("hyper_parameters") or {}),
            "data": _plain(ckpt.get("datamodule_hyper_parameters") or {}),
            "ensemble": _plain({k: v for k, v in (ensemble or {}).items() if k != "member_configs"}),
        },
        box_class_names=list(meta.get("box_class_names") or []),
        tasks=tasks,
        grade_class_names=named_grade_class_names(meta, tasks),
        points=_plain({**{k: meta[k] for k in ("grasp_top_k", "grasp_nms_radius") if meta.get(k) is not None}, **(meta.get("points") or {})}),
    )


def named_grade_class_names(meta: dict[str, Any], tasks: list[str]) -> dict[str, list[str]]:
    """``{q: grade names}`` of each named grading task in ``tasks`` whose names the checkpoint record
    ``meta`` holds (``class_names_<q>``, ``q`` the task's output suffix: ``grading/xray`` → ``xray``)."""
    out = {}
    for task in tasks:
        kind, _, qualifier = task.partition("/")
        q = qualifier.replace("/", "_")
        names = meta.get(f"class_names_{q}") if kind == "grading" and q else None
        if names:
            out[q] = [str(n) for n in names]
    return out


def _plain(value: Any) -> Any:
    """JSON-safe copy of recorded hyperparameters (unknown objects become their repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
