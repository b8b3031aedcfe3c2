"""GraspSuccess: analytic success and coverage of decoded grasps, as one torchmetrics ``Metric``.

Per sample, the decoded grasps (sensor metres, best first) are checked on the sample's mesh with
:func:`~lineside.pointcloud.grasp_dataset.grasp_success` (antipodal contacts, friction cone, no
jaw/palm collision; grasps with score 0, i.e. none left, fail):

* ``grasp_top1`` / ``grasp_top5``: share of samples whose best (any of the best five) grasp succeeds
  under the lenient check (jaws open to the gripper's maximum, re-centred between the contacts);
* ``grasp_top1_strict`` / ``grasp_top5_strict``: the same with the grasp executed as predicted
  (centre, closing axis and width as given, jaws opened to width + ``clearance``, approach from a
  stand-off, no re-centring; ``protocol="strict"`` of ``grasp_success``), when widths are given;
* ``grasp_coverage``: how much of the graspable surface the top K reaches. The ground-truth
  centres are clustered greedily (a centre farther than ``coverage_radius`` from every earlier
  seed starts a new cluster); a cluster is covered when a *successful* decoded grasp lies within
  ``coverage_radius`` of its seed. Coverage = covered / clusters, averaged over the samples with
  ground truth; it is bounded by K / clusters, so it rewards spread-out correct grasps.

The mesh check runs at :meth:`update`; the states are sums, so nothing but counts is kept.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["GraspSuccess", "covered_fraction"]


def covered_fraction(hits: Tensor, gt: Tensor, radius: float) -> float:
    """Share of the greedy clusters of ground-truth centres ``gt`` (M, 3) whose seed has a point of
    ``hits`` (H, 3) within ``radius`` (see the module docstring)."""
    seeds: list[Tensor] = []
    for c in gt:
        if all(float(torch.linalg.vector_norm(c - s)) > radius for s in seeds):
            seeds.append(c)
    if not seeds or not len(hits):
        return 0.0
    d = torch.cdist(torch.stack(seeds)[None].double(), hits[None].double())[0]  # (S, H)
    return float((d.amin(1) <= radius).double().mean())


class GraspSuccess(Metric):
    """Top-1 / top-5 analytic grasp success and graspable-region coverage.

    Args:
        coverage_radius: cluster and reach radius of the coverage (m).
        gripper: the parallel-jaw gripper of the check (default
            :class:`~lineside.pointcloud.grasp_labels.ParallelJawGripper`); set from the data module.
        mu: friction coefficient of the check.
        clearance / width_tolerance / standoff: the strict check's jaw clearance over the predicted
            width, allowed |width - contact distance| and approach stand-off (m).

    Shapes:
        update: position / approach / closing (N, K, 3) float sensor metres, score (N, K), ``meshes``
        N mesh references (:func:`~lineside.pointcloud.grasp_dataset.load_mesh`), gt (N, M, 3)
        ground-truth grasp centres in sensor metres with gt_mask (N, M) bool, width (N, K) predicted
        jaw widths (m; optional: without them the strict figures are not computed).
        compute: → dict ``grasp_top1``, ``grasp_top5``, ``grasp_coverage`` (+ ``grasp_top1_strict``,
        ``grasp_top5_strict``) (scalar tensors).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, coverage_radius: float = 0.02, gripper=None, mu: float = 0.5, clearance: float | None = None,
                 width_tolerance: float | None = None, standoff: float | None = None, **kwargs) -> None:
        from lineside.pointcloud.grasp_labels import STRICT_CLEARANCE, STRICT_STANDOFF, STRICT_WIDTH_TOLERANCE

        super().__init__(**kwargs)
        self.coverage_radius = float(coverage_radius)
        self.gripper = gripper
        self.mu = float(mu)
        self.strict = {"clearance": STRICT_CLEARANCE if clearance is None else float(clearance),
                       "width_tolerance": STRICT_WIDTH_TOLERANCE if width_tolerance is None else float(width_tolerance),
                       "standoff": STRICT_STANDOFF if standoff is None else float(standoff)}
        for name in ("top1", "top5", "samples", "coverage", "covered_samples", "strict_top1", "strict_top5", "strict_samples"):
            self.add_state(name, torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, position: Tensor, approach: Tensor, closing: Tensor, score: Tensor, meshes: Sequence,
               gt: Tensor, gt_mask: Tensor, width: Tensor | None = None) -> None:
        from lineside.pointcloud.grasp_dataset import grasp_success

        kw = {"mu": self.mu} if self.gripper is None else {"gripper": self.gripper, "mu": self.mu}
        arrays = [t.detach().float().cpu().numpy() for t in (position, approach, closing, score)]
        ok = torch.from_numpy(grasp_success(arrays[0], arrays[1], arrays[2], list(meshes), arrays[3], **kw))
        self.top1 += ok[:, :1].any(1).float().sum()
        self.top5 += ok[:, :5].any(1).float().sum()
        self.samples += ok.shape[0]
        if width is not None:
            strict = torch.from_numpy(grasp_success(arrays[0], arrays[1], arrays[2], list(meshes), arrays[3], **kw,
                                                    width=width.detach().float().cpu().numpy(), protocol="strict", **self.strict))
            self.strict_top1 += strict[:, :1].any(1).float().sum()
            self.strict_top5 += strict[:, :5].any(1).float().sum()
            self.strict_samples += strict.shape[0]
        pos, gt, gt_mask = position.detach().cpu(), gt.detach().cpu(), gt_mask.detach().cpu().bool()
        for i in range(ok.shape[0]):
            if bool(gt_mask[i].any()):
                self.coverage += covered_fraction(pos[i][ok[i]], gt[i][gt_mask[i]], self.coverage_radius)
                self.covered_samples += 1

    def compute(self) -> dict[str, Tensor]:
        n = self.samples.clamp_min(1)
        return {
            "grasp_top1": self.top1 / n,
            "grasp_top5": self.top5 / n,
            "grasp_coverage": self.coverage / self.covered_samples.clamp_min(1),
        } | ({"grasp_top1_strict": self.strict_top1 / self.strict_samples, "grasp_top5_strict": self.strict_top5 / self.strict_samples}
             if int(self.strict_samples) else {})
