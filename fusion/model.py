"""InspectionModel: the pure ``nn.Module`` (encoders → fusion → task heads). No optimizers, no logging.

Modalities and tasks are siblings, each optional: the model holds the encoders and heads it was
configured with, encodes the modalities a batch carries, fuses them in one transformer and runs
every task whose modality is present (:mod:`lineside.fusion.tasks`: each head belongs to one
task, which brings its criterion, decoder and metrics). A task whose head is absent (or whose
modality is missing from the batch) is ``None`` in :class:`InspectionOutput`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.tasks import Task, task_for

__all__ = ["InspectionOutput", "InspectionModel"]

_ENCODERS = {"image": "an image encoder", "points": "a point encoder", "text": "a text encoder"}
_SLOTS = {"grading": "grading_head", "localization": "localization_head", "grasp": "grasp_head"}  # built-in tasks' heads


class InspectionOutput(NamedTuple):
    """Raw model outputs, one field per built-in task (``None`` when the task's head or modality is absent).

    Attributes:
        grade_logits: (B, K) severity grade logits.
        localization: the localization head's raw output (per-class centre heatmaps, sizes,
            offsets, defect heatmap), when configured and images are given.
        grasp: the grasp head's raw output (per point token), when configured and points are given.
        grade_map: (B, K, h, w) each image cell's share of each grade logit
            (:meth:`GradingHead.grade_map`), only when asked for (``forward(..., grade_map=True)``).
        extra: raw outputs of the named tasks (``heads={"grading/xray": …}``) by task name.
    """

    grade_logits: Tensor | None = None
    localization: Any = None
    grasp: Any = None
    grade_map: Tensor | None = None
    extra: dict[str, Any] | None = None

    def task_output(self, source: str) -> Any:
        """One task's raw output: a field above (built-in tasks) or a task name in ``extra``."""
        if source in self._fields:
            return getattr(self, source)
        return (self.extra or {}).get(source)


class InspectionModel(nn.Module):
    """Encoders (image, points, text) + fusion transformer + task heads (grading, localization, grasp).

    Args:
        image_encoder: images → tokens (:class:`vision.image_encoder.ImageEncoder`); modality ``"image"``.
        fusion: fuses the tokens of all modalities with the task queries.
        grading_head: severity grade logits from the fused sequence.
        point_encoder: padded point clouds → tokens (:class:`pointcloud.point_encoder.PointEncoder`);
            modality ``"points"``.
        text_encoder: texts → tokens (:class:`fusion.text_encoder.TextEncoder`); modality ``"text"``.
        localization_head: dense defect localization on the fused image tokens; called as
            ``head(fused, encoded["image"])``.
        grasp_head: grasp suggestion on the fused point tokens; called as ``head(fused, encoded["points"])``.
        heads: further tasks' heads by task name: a registered task kind (``{"segmentation": …}``) or
            a repeated one, ``kind/qualifier`` (``{"grading/xray": GradingHead(...)}``), with its own
            labels and outputs (:mod:`lineside.fusion.tasks.base`).

    Shapes:
        forward: image (B, C, H, W) uint8/float in 0..255, points (B, P, 3) float32 with
        point_mask (B, P) bool (and optional point_features (B, P, F)), text: list of B strings
        (``""``/None = no text for that sample), a tuple ``(input_ids, attention_mask)`` (B, T) or an
        already encoded ``EncoderOutput``
        → :class:`InspectionOutput`. A model without a text encoder ignores ``text``.
    """

    def __init__(
        self,
        image_encoder: nn.Module | None = None,
        fusion: FusionTransformer | None = None,
        grading_head: GradingHead | None = None,
        point_encoder: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        localization_head: nn.Module | None = None,
        grasp_head: nn.Module | None = None,
        heads: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if fusion is None:
            raise ValueError("InspectionModel needs a fusion transformer")
        encoders = {"image": image_encoder, "points": point_encoder, "text": text_encoder}
        if not any(e is not None for e in encoders.values()):
            raise ValueError("InspectionModel needs at least one encoder (image_encoder, point_encoder or text_encoder)")
        for name, enc in encoders.items():
            if enc is None:
                continue
            if enc.embed_dim != fusion.embed_dim:
                raise ValueError(f"{name} encoder embed_dim={enc.embed_dim} != fusion.embed_dim={fusion.embed_dim}")
            if name not in fusion.modality_names:
                raise ValueError(f"the fusion transformer has no {name!r} modality; add it to fusion.init_args.modalities "
                                 f"(configured: {fusion.modality_names})")
        self.image_encoder = image_encoder
        self.point_encoder = point_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.grading_head = grading_head
        self.localization_head = localization_head
        self.grasp_head = grasp_head
        for name in heads or {}:
            if name in _SLOTS:
                raise ValueError(f"heads: the {name!r} task takes its head from the {name}_head argument; name another "
                                 f"one {name}/<qualifier> (e.g. {name}/xray)")
        self.heads = nn.ModuleDict(heads or {})
        for task in self.tasks:  # builds every task: a head of no known task raises here
            if task.modality is not None and encoders[task.modality] is None:
                raise ValueError(f"a {task.kind} head needs {_ENCODERS[task.modality]}")

    @property
    def num_grades(self) -> int:
        return self.grading_head.num_grades if self.grading_head is not None else 0

    @property
    def in_chans(self) -> int:
        return self.image_encoder.in_chans if self.image_encoder is not None else 0

    @property
    def tasks(self) -> list[Task]:
        """The tasks this model has heads for, in output order: the built-in slots, then ``heads``."""
        named = [*((kind, getattr(self, slot)) for kind, slot in _SLOTS.items()), *self.heads.items()]
        return [task_for(self, name, head) for name, head in named if head is not None]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def batch_inputs(self, batch: dict) -> dict:
        """:meth:`forward`'s keyword inputs from a training batch: ``image`` and/or ``points`` (with
        ``point_mask``, ``point_features``), and ``text`` for a model with a text encoder."""
        kw: dict = {k: batch[k] for k in ("image", "points", "point_mask") if k in batch}
        if "points" in batch:
            kw["point_features"] = batch.get("point_features")
        if self.text_encoder is not None and batch.get("text") is not None:
            kw["text"] = batch["text"]
        return kw

    def encode(self, image: Tensor | None = None, points: Tensor | None = None, point_mask: Tensor | None = None,
               point_features: Tensor | None = None, text: Any = None) -> dict:
        """Encoder outputs of the modalities given (name → ``EncoderOutput``)."""
        encoded = {}
        if image is not None:
            if self.image_encoder is None:
                raise ValueError("images were given but the model has no image encoder")
            encoded["image"] = self.image_encoder(image)
        if points is not None:
            if self.point_encoder is None:
                raise ValueError("points were given but the model has no point encoder")
            if point_mask is None:
                raise ValueError("points need a point_mask (B, P) bool, True for real points")
            encoded["points"] = self.point_encoder(points, point_mask, point_features) if point_features is not None \
                else self.point_encoder(points, point_mask)
        if text is not None and self.text_encoder is not None:
            if hasattr(text, "tokens"):  # already encoded (a prompt baked into an exported graph)
                encoded["text"] = text
            elif isinstance(text, tuple):  # (input_ids, attention_mask) token tensors
                encoded["text"] = self.text_encoder(*text)
            else:  # a list of strings
                encoded["text"] = self.text_encoder(text)
        if not encoded:
            raise ValueError("no modality given: pass image, points (with point_mask) or text")
        return encoded

    def forward(self, image: Tensor | None = None, points: Tensor | None = None, point_mask: Tensor | None = None,
                point_features: Tensor | None = None, text: Any = None, grade_map: bool = False) -> InspectionOutput:
        """``grade_map=True`` also returns the grading head's class-activation map over the image
        tokens (``InspectionOutput.grade_map``; needs a grading head and an image)."""
        encoded = self.encode(image, points, point_mask, point_features, text)
        fused = self.fusion(encoded)
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for task in self.tasks:
            (fields if task.source in InspectionOutput._fields else extra)[task.source] = task.run(fused, encoded)
            if grade_map:
                fields.update(task.explain(fused, encoded))
        return InspectionOutput(**fields, extra=extra or None)
