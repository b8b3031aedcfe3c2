"""The grasp task: where a robot should pick the part (3-D point, approach, closing direction, width, score).

Head :class:`~lineside.fusion.grasp_head.GraspHead` (one proposal per point token), criterion
:class:`~lineside.fusion.grasp_criterion.GraspCriterion`, decoder :class:`GraspTaskDecoder` (top-K with
3-D NMS, back to sensor metres with the deployable module's cloud normalisation), metrics
:class:`~lineside.fusion.grasp_metrics.GraspSuccess` (analytic success on the sample's mesh, coverage).
Labels: ``grasps`` (B, M, 11) in the normalised frame with ``grasp_mask`` (B, M); evaluation also
reads ``center`` (B, 3), ``scale`` (B,) and ``mesh`` (B references).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from lineside.fusion.grasp_criterion import GraspCriterion
from lineside.fusion.grasp_decoder import GraspDecoder
from lineside.fusion.grasp_head import GraspHead
from lineside.fusion.grasp_metrics import GraspSuccess
from lineside.fusion.outputs import TensorSpec
from lineside.fusion.tasks.base import Task, TaskDecoder, TaskSettings

__all__ = ["GraspTask", "GraspTaskDecoder"]


class GraspTaskDecoder(TaskDecoder):
    """Per-token proposals (normalised frame) → the K best grasps in sensor metres (``grasps`` wraps
    :class:`GraspDecoder`; ``context`` gives the clouds' ``center`` and ``scale``)."""

    def __init__(self, source: str, suffix: str, grasps: GraspDecoder) -> None:
        super().__init__(source, suffix)
        self.grasps = grasps

    def specs(self) -> list[TensorSpec]:
        return self.grasps.outputs()

    def decode(self, raw, context: dict) -> tuple[Tensor, ...]:
        return self.grasps.decode(raw, context["center"], context["scale"])


class GraspTask(Task):
    """Parallel-jaw 6-DoF grasp suggestions on the fused point tokens."""

    kind = "grasp"
    head_type = GraspHead
    slot = "grasp_head"
    field = "grasp"
    modality = "points"
    label_key = "grasps"
    target_keys = ("grasp_mask",)
    data_hint = "grasp labels on point clouds"
    output_names = ("grasp_position", "grasp_approach", "grasp_closing", "grasp_width", "grasp_score")
    progress = ("grasp_top1",)

    def criterion(self) -> nn.Module:
        return GraspCriterion()

    def configure(self, datamodule, stage: str, criterion: nn.Module, metrics: Sequence[GraspSuccess]) -> None:
        mu = float((getattr(datamodule, "point_config", None) or {}).get("mu", 0.5))
        for m in metrics:
            m.gripper, m.mu = getattr(datamodule, "gripper", None), mu
        return None

    def decoder(self, settings: TaskSettings) -> GraspTaskDecoder:
        return GraspTaskDecoder(self.source, self.suffix, GraspDecoder(settings.grasp_top_k, settings.grasp_nms_radius))

    def metrics(self, settings: TaskSettings) -> GraspSuccess:
        return GraspSuccess(settings.coverage_radius)

    def update(self, metrics: GraspSuccess, decoded: dict[str, Tensor], batch: dict) -> None:
        t = self.targets(batch)
        gt = t["grasps"][..., 0:3] * batch["scale"].view(-1, 1, 1) + batch["center"].unsqueeze(1)  # sensor metres
        pos, app, clo, width, score = (decoded[self.output_name(n)] for n in self.output_names)
        metrics.update(pos, app, clo, score, batch["mesh"], gt, t["grasp_mask"], width)

    def compute(self, metrics: GraspSuccess, stage: str, label_names: Sequence[str]) -> dict[str, Any]:
        return dict(metrics.compute()) if metrics.update_called and int(metrics.samples) else {}

    def checkpoint_record(self, datamodule, settings: TaskSettings) -> dict[str, Any]:
        """What a checkpoint records for the point side: the data module's cloud preparation and the decoder's K and radius."""
        return {"points": getattr(datamodule, "point_config", None), "grasp_top_k": settings.grasp_top_k,
                "grasp_nms_radius": settings.grasp_nms_radius}
