"""PatchMemory: anomaly scores and heatmaps learned from good parts only.

No defect labels and no training: a frozen ImageNet backbone embeds every patch of a set of
good images into a memory; a patch of a new image that is far from every remembered good patch
is anomalous. The image score is the largest patch distance, the heatmap is the distance per
patch (PatchCore, Roth et al., CVPR 2022, with a seeded random subset of the memory instead of
the greedy coreset). Useful on its own when only good parts are at hand (a new line, a new
product), and as a second opinion beside a trained grader: on ELPV's module-disjoint folds it
ranks defective cells better than the trained grader on the hardest modules (README).

    lineside patch-memory fit --input good_cells/ --out memory.pt
    lineside patch-memory score --memory memory.pt --input labelled.csv --good-label ok --output scores.csv
    lineside patch-memory crossval --folds 5 --out runs/patch_memory/elpv_cv.npz   # built-in ELPV, block folds

The module is a plain ``nn.Module``: ``forward(uint8 images) -> (score, heatmap)``, with the
memory as a buffer; ``save``/``load`` write one self-contained file. Decoding files, fitting
and scoring them, overlays and AUROC live in :mod:`lineside.vision.patch_memory_scoring`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.vision.image_encoder import ImageEncoder

__all__ = ["AnomalyOutput", "PatchMemory", "PatchMemoryError"]


class PatchMemoryError(RuntimeError):
    """A memory file is missing, not a lineside memory, or not fitted."""


class AnomalyOutput(NamedTuple):
    """score: (B,) distance of the most anomalous patch; heatmap: (B, h, w) distance per patch."""

    score: Tensor
    heatmap: Tensor


class PatchMemory(nn.Module):
    """Nearest-neighbour memory of good-image patch features.

    Args:
        backbone: timm backbone (frozen) whose features describe the patches.
        in_chans: 1 (EL, X-ray) or 3 (RGB).
        feature_levels: backbone levels concatenated per patch (EfficientNet: 2 = stride 8,
            3 = stride 16); each is smoothed over 3x3 neighbours, deeper levels are upsampled
            to the first level's grid.
        stride: stride of the heatmap grid (a multiple of the first level's stride); coarser
            grids keep the memory small.
        image_size: images are resized to this square side (300 = ELPV's native size: thin
            cracks survive).
        max_patches: memory size; a seeded random subset of all good patches is kept.
        pretrained / weights_path: backbone weights as in :class:`ImageEncoder` (offline).
        seed: seed of the memory subset.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        in_chans: int = 1,
        feature_levels: Sequence[int] = (2, 3),
        stride: int = 16,
        image_size: int = 300,
        max_patches: int = 40000,
        pretrained: bool = True,
        weights_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = {
            "backbone": backbone, "in_chans": in_chans, "feature_levels": list(feature_levels), "stride": stride,
            "image_size": image_size, "max_patches": max_patches, "seed": seed,
        }  # fmt: skip
        # embed_dim=1: the encoder's token projection is not used, only its backbone and normalisation
        self.encoder = ImageEncoder(backbone, embed_dim=1, in_chans=in_chans, feature_levels=feature_levels, pretrained=pretrained, weights_path=weights_path)
        self.encoder.requires_grad_(False).eval()
        strides = self.encoder.strides
        if stride % strides[0]:
            raise ValueError(f"stride {stride} must be a multiple of the first feature level's stride {strides[0]}")
        self.stride, self.image_size, self.max_patches, self.seed = stride, image_size, max_patches, seed
        self.dim = sum(self.encoder.backbone.feature_info.channels())
        self.register_buffer("memory", torch.zeros(0, self.dim))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def train(self, mode: bool = True) -> "PatchMemory":
        super().train(mode)
        self.encoder.eval()  # frozen: batch norms keep their ImageNet statistics
        return self

    @property
    def fitted(self) -> bool:
        return self.memory.shape[0] > 0

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) uint8/float 0..255 → (B, h, w, D) patch features on the ``stride`` grid."""
        from lineside.vision.preprocess import FramePreprocessor

        x = FramePreprocessor(self.image_size)(images)  # the one resize of every path (no-op at image_size)
        feats = self.encoder.backbone(self.encoder.normalize(x))
        grid = feats[0].shape[-2:]
        parts = [F.avg_pool2d(f.float(), 3, 1, 1) for f in feats]
        parts = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in parts]
        z = torch.cat(parts, 1)
        pool = self.stride // self.encoder.strides[0]
        if pool > 1:
            z = F.avg_pool2d(z, pool, pool)
        return z.permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor], progress: bool = False) -> "PatchMemory":
        """Fill the memory from batches of good images (uint8 (B, C, H, W)); returns self."""
        from tqdm import tqdm

        chunks = [self.embed(b).half() for b in tqdm(batches, desc="memory", unit="batch", disable=not progress)]
        if not chunks:
            raise PatchMemoryError("no good images to fit the memory on")
        return self.fit_features(torch.cat(chunks))

    def fit_features(self, features: Tensor) -> "PatchMemory":
        """Fill the memory from patch features (..., D) of good images (as :meth:`embed` gives)."""
        bank = features.reshape(-1, self.dim)
        if not len(bank):
            raise PatchMemoryError("no good images to fit the memory on")
        if len(bank) > self.max_patches:
            g = torch.Generator().manual_seed(self.seed)
            bank = bank[torch.randperm(len(bank), generator=g)[: self.max_patches]]
        self.memory = bank.float().to(self.memory.device)
        self.threshold = torch.tensor(float("nan"), device=self.memory.device)
        return self

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], quantile: float = 0.99) -> float:
        """Set ``threshold`` to the ``quantile`` of the scores of good images kept out of the memory."""
        scores = [self(b).score for b in batches]
        if not scores:
            raise PatchMemoryError("no held-out good images to calibrate the threshold on")
        self.threshold = torch.quantile(torch.cat(scores).float(), quantile).to(self.memory.device)
        return float(self.threshold)

    def score_features(self, features: Tensor) -> AnomalyOutput:
        """Patch features (B, h, w, D) → score (B,) and heatmap (B, h, w): distance to the nearest good patch."""
        if not self.fitted:
            raise PatchMemoryError("the memory is empty: fit() it on good images first")
        b, h, w, d = features.shape
        q = features.reshape(-1, d).float()
        qq = (q * q).sum(1, keepdim=True)
        best = None
        for m in self.memory.split(8192):  # bounded RAM: (B·h·w) x 8192 distances at a time
            d2 = (qq - 2.0 * q @ m.T + (m * m).sum(1)).amin(1)
            best = d2 if best is None else torch.minimum(best, d2)
        heat = best.clamp_min(0).sqrt().reshape(b, h, w)
        return AnomalyOutput(heat.flatten(1).amax(1), heat)

    def forward(self, images: Tensor) -> AnomalyOutput:
        return self.score_features(self.embed(images))

    def save(self, path: str | os.PathLike) -> Path:
        """Write config, backbone and memory (one self-contained file; no weights needed to load)."""
        if not self.fitted:
            raise PatchMemoryError("refusing to save an empty memory: fit() it first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"lineside_patch_memory": 1, "config": self.config, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "PatchMemory":
        path = Path(path)
        if not path.is_file():
            raise PatchMemoryError(f"{path}: memory file not found")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise PatchMemoryError(f"{path}: not a readable memory file ({exc})") from None
        if not isinstance(obj, dict) or "lineside_patch_memory" not in obj:
            raise PatchMemoryError(f"{path}: not a lineside patch memory (write one with `lineside patch-memory fit`)")
        model = cls(**obj["config"], pretrained=False)
        model.memory = torch.empty_like(obj["state_dict"]["memory"])
        model.load_state_dict(obj["state_dict"])
        return model.eval()

