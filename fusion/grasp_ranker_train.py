"""Training of :class:`~lineside.fusion.grasp_ranker.GraspRanker` (kept apart from the inference part,
which the runtime loads without any training code)."""

from __future__ import annotations

import numpy as np
import torch
from lineside.fusion.grasp_ranker import GraspRanker, GraspRankerConfig
from lineside.pointcloud.grasp_candidates import CandidateConfig
from lineside.pointcloud.grasp_labels import ParallelJawGripper
from torch import nn

__all__ = ["train_ranker"]


def train_ranker(
    crops: np.ndarray,
    features: np.ndarray,
    strict: np.ndarray,
    lenient: np.ndarray | None = None,
    *,
    config: GraspRankerConfig = GraspRankerConfig(),
    candidates: CandidateConfig = CandidateConfig(),
    gripper: ParallelJawGripper = ParallelJawGripper(),
    epochs: int = 6,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    lenient_weight: float = 0.3,
    seed: int = 0,
    progress: bool = True,
) -> GraspRanker:
    """Fit a :class:`GraspRanker` with BCE on the strict labels (+ ``lenient_weight`` × BCE on the lenient ones).

    Args:
        crops: (N, P, C) candidate crops. features: (N, F) scalars. strict / lenient: (N,) bool labels
            from the mesh checks. epochs, batch_size, lr, weight_decay: AdamW with cosine decay.
        seed: initialisation and shuffling seed. progress: a tqdm bar over epochs.

    Raises:
        ValueError: mismatched lengths, no samples, or labels of a single class.
    """
    n = len(crops)
    strict = np.asarray(strict, bool)
    lenient = strict if lenient is None else np.asarray(lenient, bool)
    if n == 0:
        raise ValueError("train_ranker: no candidates to train on")
    if not (len(features) == len(strict) == len(lenient) == n):
        raise ValueError(f"train_ranker: {n} crops, {len(features)} feature rows, {len(strict)} strict and {len(lenient)} lenient labels")
    if strict.all() or not strict.any():
        raise ValueError(f"train_ranker: all {n} strict labels are {bool(strict[0])}; a ranker needs passing and failing candidates")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GraspRanker(config, candidates, gripper)
    x = torch.as_tensor(np.asarray(crops), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.stack([strict, lenient], 1), dtype=torch.float32)
    pos = y.mean(0).clamp(1e-3, 1 - 1e-3)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt(), reduction="none")  # soften the class imbalance
    w = torch.tensor([1.0, lenient_weight])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="grasp ranker", unit="epoch", mininterval=5)
    model.train()
    for _ in it:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = (loss_fn(model(x[idx], f[idx]), y[idx]) * w).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
