"""GraspRanker: a small PointNet that scores grasp candidates, the second half of the
candidate-then-score grasp planner (candidates from :mod:`lineside.pointcloud.grasp_candidates`).

Each candidate is seen as its local crop in the gripper frame (``(P, C)`` points, see
:func:`~lineside.pointcloud.grasp_candidates.candidate_crops`) and a few scalars
(:func:`~lineside.pointcloud.grasp_candidates.candidate_features`). A shared per-point MLP and a
max-pool summarise the crop; an MLP on [pooled crop, scalars] gives two logits: ``strict`` (does
the grasp pass :func:`~lineside.pointcloud.grasp_labels.evaluate_grasps_strict` as given?) and
``lenient`` (an auxiliary target: :func:`~lineside.pointcloud.grasp_labels.evaluate_grasps`).
Candidates are ranked by the strict probability; :func:`rank_candidates` keeps the best ``k`` after a
greedy 3-D NMS on their centres.

Usage::

    ranker = GraspRanker.load("runs/grasp_ranker/ranker_procedural.pt")
    grasps = ranker.suggest(points, normals, k=5)      # (k', 11) sensor-frame grasps, best first, score = p(strict)

Training is :func:`lineside.fusion.grasp_ranker_train.train_ranker`; this module is the inference
part (model, ranking, file I/O) that ``lineside score`` / ``station`` load a ranker file with.

Files (:meth:`GraspRanker.save`): a torch file ``{"format": "lineside-grasp-ranker", "version", "config",
"candidates", "gripper", "state_dict"}``, so a ranker brings its candidate settings and gripper along.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lineside.pointcloud.grasp_candidates import (
    CROP_CHANNELS,
    FEATURE_NAMES,
    CandidateConfig,
    candidate_crops,
    candidate_features,
    grasp_candidates,
)
from lineside.pointcloud.grasp_labels import ParallelJawGripper
from torch import nn

__all__ = ["FILE_FORMAT", "GraspRanker", "GraspRankerConfig", "is_ranker_file", "rank_candidates"]

FILE_FORMAT, FILE_VERSION = "lineside-grasp-ranker", 1


@dataclass(frozen=True)
class GraspRankerConfig:
    """Sizes of :class:`GraspRanker`.

    Attributes:
        crop_points: points per candidate crop. crop_channels / num_features: input sizes (the
            defaults of :mod:`~lineside.pointcloud.grasp_candidates`).
        widths: per-point MLP widths. hidden: head MLP width. dropout: head dropout.
        nms_radius: candidates whose centres lie closer than this (m) to a better one are skipped in top-k.
    """

    crop_points: int = 32
    crop_channels: int = CROP_CHANNELS
    num_features: int = len(FEATURE_NAMES)
    widths: tuple = (32, 64)
    hidden: int = 64
    dropout: float = 0.1
    nms_radius: float = 0.01


class GraspRanker(nn.Module):
    """Crop + scalars → logits ``(B, 2)``: [:, 0] strict success, [:, 1] lenient success.

    Args:
        config: :class:`GraspRankerConfig`. candidates: the :class:`CandidateConfig` used to draw
            candidates in :meth:`suggest`. gripper: the gripper the labels were computed for.
    """

    def __init__(self, config: GraspRankerConfig = GraspRankerConfig(), candidates: CandidateConfig = CandidateConfig(),
                 gripper: ParallelJawGripper = ParallelJawGripper()) -> None:
        super().__init__()
        self.config, self.candidates, self.gripper = config, candidates, gripper
        layers, c = [], config.crop_channels
        for w in config.widths:
            layers += [nn.Linear(c, w), nn.LayerNorm(w), nn.GELU()]
            c = w
        self.point_mlp = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(c + config.num_features, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden // 2), nn.GELU(), nn.Linear(config.hidden // 2, 2),
        )

    def forward(self, crops: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """crops (B, P, C) float, features (B, F) float → logits (B, 2)."""
        pooled = self.point_mlp(crops).amax(1)
        return self.head(torch.cat([pooled, features], 1))

    @torch.inference_mode()
    def score(self, crops: np.ndarray, features: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(G,) strict success probabilities of prepared candidates."""
        if len(crops) != len(features):
            raise ValueError(f"GraspRanker.score: {len(crops)} crops but {len(features)} feature rows")
        if len(crops) == 0:
            return np.zeros(0, np.float32)
        self.eval()
        out = [torch.sigmoid(self(torch.as_tensor(crops[i : i + batch], dtype=torch.float32),
                                  torch.as_tensor(features[i : i + batch], dtype=torch.float32))[:, 0])
               for i in range(0, len(crops), batch)]
        return torch.cat(out).numpy()

    def suggest(self, points: np.ndarray, normals: np.ndarray, k: int = 5, rng: int = 0) -> np.ndarray:
        """Grasps for an observed cloud: (k', 11) sensor-frame grasps (k' <= k), best first, score column =
        the strict success probability. Raises ``ValueError`` for an empty, non-finite or degenerate cloud."""
        cand = grasp_candidates(points, normals, self.gripper, self.candidates, rng=rng)
        if len(cand) == 0:
            return cand.grasps
        crops = candidate_crops(points, normals, cand.grasps, self.config.crop_points, self.gripper, rng=rng)
        feats = candidate_features(points, normals, cand.grasps, cand.source, self.gripper)
        order = rank_candidates(self, crops, feats, cand.grasps, k)
        out = cand.grasps[order].copy()
        out[:, 10] = self.score(crops[order], feats[order])
        return out

    def save(self, path: str | Path) -> Path:
        """Write the ranker (weights + config + candidate settings + gripper) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FILE_FORMAT, "version": FILE_VERSION, "config": asdict(self.config),
                    "candidates": asdict(self.candidates), "gripper": asdict(self.gripper), "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GraspRanker:
        """Read a file written by :meth:`save`; a clear ``ValueError`` naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such grasp ranker file")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a grasp ranker file ({type(e).__name__}: {e})") from e
        if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: not a grasp ranker file (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r})")
        if blob.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: grasp ranker file version {blob.get('version')}, this lineside reads {FILE_VERSION}")
        tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        model = cls(GraspRankerConfig(**tuples(blob["config"])), CandidateConfig(**tuples(blob["candidates"])),
                    ParallelJawGripper(**blob["gripper"]))
        model.load_state_dict(blob["state_dict"])
        return model.eval()


def _nms_order(grasps: np.ndarray, scores: np.ndarray, k: int, radius: float) -> np.ndarray:
    chosen: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(np.linalg.norm(grasps[i, 0:3] - grasps[j, 0:3]) > radius for j in chosen):
            chosen.append(int(i))
        if len(chosen) == k:
            break
    return np.array(chosen, np.int64)


def rank_candidates(ranker: GraspRanker, crops: np.ndarray, features: np.ndarray, grasps: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the best ``k`` candidates by the ranker's strict probability, greedy NMS on their
    centres (``config.nms_radius``), best first."""
    return _nms_order(np.asarray(grasps), ranker.score(crops, features), k, ranker.config.nms_radius)


def is_ranker_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by :meth:`GraspRanker.save`, judged by its content without
    unpickling it (a torch zip whose pickle names :data:`FILE_FORMAT`); False for anything else."""
    import zipfile

    p = Path(path)
    try:
        if not p.is_file() or not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as zf:
            pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            return len(pickles) == 1 and zf.getinfo(pickles[0]).file_size < (1 << 20) and FILE_FORMAT.encode() in zf.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False
