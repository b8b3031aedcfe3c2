"""Structured pruning of the image backbone's channels (``torch-pruning``), and rebuilding pruned models.

:func:`prune_backbone` removes the least important channels (L2 magnitude of each coupled group,
found by torch-pruning's dependency graph) from every convolution of the image encoder's backbone:
``ratio`` 0.5 keeps half the channels of each layer (≈ a quarter of its weights). The encoder's
token projection keeps its output width (the fusion transformer's ``embed_dim``) and only loses
the inputs that fed from pruned channels, so the fusion transformer and heads are untouched.

A pruned checkpoint (``lineside prune``) is an ordinary lineside checkpoint whose weights are
smaller than its config says, marked ``checkpoint["lineside"]["pruned"]``: :func:`fit_to_state`
re-shapes the modules built from the config to the saved tensors (convs, norms, linears: their
weight shapes and channel attributes), so the file holds only tensors and plain values and loads
with ``weights_only=True``. :func:`lineside.fusion.adapters.load_weights` does that for
``--model.init_from`` (fine-tune a pruned model) and for an adapter's base.

``torch_pruning`` is imported only inside :func:`prune_backbone` (``pip install 'lineside[adapt]'``);
re-shaping and loading are plain torch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["count_parameters", "fit_to_state", "prune_backbone"]

ADAPT_EXTRA = "pip install 'lineside[adapt]'"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _param(shape: torch.Size, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


def fit_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Re-shape ``model``'s convs, batch/layer norms and linears to the tensors of ``state`` (in place),
    so a pruned model's weights load into a model built from its original config. Returns the names
    of the modules changed (values are left to ``load_state_dict``)."""
    changed = []
    for name, m in model.named_modules():
        w = state.get(f"{name}.weight" if name else "weight")
        if w is None or not isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm)):
            continue
        if m.weight is None or tuple(m.weight.shape) == tuple(w.shape):
            continue
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = int(w.shape[0])
            m.groups = int(w.shape[0]) if depthwise else m.groups
            m.in_channels = int(w.shape[1]) * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = tuple(w.shape)
        else:
            m.num_features = int(w.shape[0])
            for buf in ("running_mean", "running_var"):
                if getattr(m, buf, None) is not None:
                    setattr(m, buf, torch.empty(w.shape, dtype=getattr(m, buf).dtype))
        m.weight = _param(w.shape, m.weight)
        b = state.get(f"{name}.bias")
        if getattr(m, "bias", None) is not None and b is not None:
            m.bias = _param(b.shape, m.bias)
        changed.append(name)
    return changed


def prune_backbone(model: nn.Module, ratio: float, image_size: int = 224, round_to: int = 8) -> dict[str, int]:
    """Remove ``ratio`` of the channels of every backbone layer of ``model.image_encoder`` (in place).

    Args:
        model: an :class:`~lineside.fusion.model.InspectionModel` with an image encoder.
        ratio: share of each layer's channels removed (0 < ratio < 1).
        image_size: side of the example frame used to trace the dependency graph.
        round_to: kept channel counts are multiples of this (fast kernels).

    Returns ``{"before": n, "after": n}`` parameter counts of the whole model.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        raise ValueError("pruning works on the image backbone: this model has no image encoder")
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(f"structured pruning needs torch-pruning: {ADAPT_EXTRA}") from exc
    before = count_parameters(model)
    was_training = encoder.training
    encoder.eval()
    example = torch.randint(0, 256, (1, encoder.in_chans, image_size, image_size), dtype=torch.uint8).float()
    # everything outside the backbone keeps its output channels (it may still lose inputs fed by pruned channels)
    ignored = [m for name, m in encoder.named_modules() if not name.startswith("backbone") and isinstance(m, (nn.Conv2d, nn.Linear))]
    with warnings.catch_warnings():  # the encoder's own parameters (level embedding) sit after the ignored projection
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            encoder, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=ignored, round_to=round_to,
            output_transform=lambda out: sum(t.float().sum() for t in _tensors(out)),
        )
        pruner.step()
    encoder.train(was_training)
    return {"before": before, "after": count_parameters(model)}


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []
