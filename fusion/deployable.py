"""DeployableModel: the one module every backend runs (eager torch, ONNX Runtime, AOTInductor, TensorRT),
and the one ``lineside test`` / validation evaluate.

    uint8 frames (N, C, H, W) → FramePreprocessor (resize to the training size, inside)
        → InspectionModel / InspectionEnsemble (normalisation inside the image encoder)
        → the tasks' decoders (test-time views folded in) → named outputs

    padded clouds (N, P, 3) in sensor metres + point_mask (N, P) [+ point_normals (N, P, 3)]
        → CloudNormalizer (centre and scale as in training, inside) → InspectionModel
        → the tasks' decoders (grasps: top-K with 3-D NMS, back to sensor metres) → named outputs

Inputs are listed as :class:`TensorSpec` rows (:meth:`DeployableModel.input_specs`): ``image``
for a model with an image encoder, ``points`` / ``point_mask`` (/ ``point_normals`` when the point
encoder takes normals as features) for one with a point encoder, both for an image + point model;
``forward`` takes them positionally in that order.

Outputs are the concatenation of the model's tasks' decoder rows, in task order
(:mod:`lineside.fusion.tasks`: grading ``grade_probs``, ``grade``[, ``grade_heatmap``]; localization
``boxes``, ``box_scores``, ``box_labels``, ``defect_heatmap``; grasp ``grasp_position`` …). Metadata,
parity checks, Triton configs, the station and the result records read the rows, never a
hard-coded list.

Evaluation (:meth:`DeployableModel.evaluate`, :func:`batch_inputs`) runs this same module on a
training batch (its uint8 frames at the training size, its clouds mapped back to sensor metres),
so ``lineside test`` and ``lineside score`` decode identically.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lineside.fusion.outputs import TensorSpec
from lineside.fusion.postprocess import GradeDecoder, dihedral_views, repeat_views
from lineside.fusion.tasks import TaskSettings
from lineside.pointcloud.cloud_normalizer import CloudNormalizer
from lineside.vision.preprocess import FramePreprocessor

__all__ = ["DeployableModel", "FixedTextEncoding", "GradeDecoder", "TensorSpec", "batch_inputs"]


class FixedTextEncoding(nn.Module):
    """A prompt encoded once by a text encoder, kept as constants and expanded to the batch.

    Shapes:
        forward: like (B, …) → ``EncoderOutput`` with tokens (B, L, D), positions (B, L, 1), padding (B, L).
    """

    def __init__(self, text_encoder: nn.Module, prompt: str) -> None:
        super().__init__()
        with torch.no_grad():
            enc = text_encoder.eval()([prompt])
        self.register_buffer("tokens", enc.tokens.detach().clone())
        self.register_buffer("positions", enc.positions.detach().clone())
        self.register_buffer("padding", enc.padding_mask.detach().clone())
        self._output_type = type(enc)

    def forward(self, like: Tensor):
        b = like.shape[0]
        return self._output_type(self.tokens.expand(b, -1, -1), self.positions.expand(b, -1, -1), self.padding.expand(b, -1))


class DeployableModel(nn.Module):
    """uint8 frames and/or padded clouds in, named decoded outputs out (a tuple in :meth:`output_names` order).

    One decoder per task of the model (``model.tasks``), in task order; the outputs are the
    concatenation of their rows.

    Args:
        model: an ``InspectionModel`` or ``InspectionEnsemble``.
        train_size: (H, W) the model was trained on.
        input_size: (H, W) of the frames the artefact takes (fixed at export); default ``train_size``.
        channels: 1 or 3.
        tta_views: dihedral test-time views folded into the graph (1 = off).
        class_names: grade names.
        text_prompt: for a model with a text encoder, the prompt baked into the graph as constant
            token ids (no tokenizer at the station; one graph per prompt). ``""`` = no text.
        box_class_names: defect (box) class names, index = box label.
        top_k: boxes per frame (at most classes × heatmap cells).
        num_points: P, the points per cloud the artefact takes (models with a point encoder;
            the training ``num_points``).
        grasp_top_k: K grasps per cloud (models with a grasp head).
        grasp_nms_radius: grasps whose centres lie within this distance (m) of a better one are
            suppressed.
        grade_heatmap: a grading model on images also returns ``grade_heatmap`` (N, 1, h, w), the
            grading head's class-activation map of the defective grades
            (:class:`fusion.grade_heatmap.GradeHeatmapDecoder`), right after ``grade``.

    Shapes:
        forward: the inputs of :meth:`input_specs` in order: image (N, C, H_in, W_in) uint8;
        points (N, P, 3) float32 sensor metres, point_mask (N, P) bool, point_normals (N, P, 3)
        float32 (when the point encoder takes normals) → the outputs of :meth:`output_specs`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_size: Sequence[int],
        input_size: Sequence[int] | None = None,
        channels: int = 1,
        tta_views: int = 1,
        class_names: Sequence[str] | None = None,
        text_prompt: str | None = None,
        box_class_names: Sequence[str] | None = None,
        top_k: int = 100,
        num_points: int = 1024,
        grasp_top_k: int = 5,
        grasp_nms_radius: float = 0.01,
        grade_heatmap: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_size = (int(train_size[0]), int(train_size[1]))
        self.input_size = tuple(int(v) for v in (input_size or self.train_size))
        self.channels = channels
        self.tta_views = tta_views
        if tta_views > 1 and self.train_size[0] != self.train_size[1]:
            raise ValueError(f"test-time views need a square training size, got {self.train_size}")
        self.has_image = model.in_chans > 0
        point_encoder = getattr(model, "point_encoder", None)
        self.num_points = int(num_points) if point_encoder is not None else None
        self.point_features = None
        self.normalizer = None
        if point_encoder is not None:
            if tta_views > 1:
                raise ValueError("test-time views are image flips; a model with a point encoder runs one view (tta_views=1)")
            in_features = int(getattr(point_encoder, "in_features", 0))
            if in_features not in (0, 3):
                raise ValueError(f"the point encoder takes {in_features} features per point; deployable models feed normals (3) or none")
            self.point_features = "normals" if in_features == 3 else None
            self.normalizer = CloudNormalizer()
        self.preprocess = FramePreprocessor(self.train_size) if self.has_image else None
        tasks = model.tasks
        settings = TaskSettings(tta_views=tta_views, top_k=top_k, grasp_top_k=grasp_top_k, grasp_nms_radius=grasp_nms_radius,
                                grade_heatmap=grade_heatmap).at(self.train_size, self.input_size)
        self.decoders = nn.ModuleDict({t.name: t.decoder(settings) for t in tasks})
        if not len(self.decoders):
            raise ValueError("the model has no task head (grading, localization, grasp …): nothing to deploy")
        self.model_options = {k: v for d in self.decoders.values() for k, v in d.model_options.items()}
        self.label_names = {t.name: t.label_names() for t in tasks}
        self.class_names = list(class_names or self.label_names.get("grading", []))
        self.box_class_names = list(box_class_names or self.label_names.get("localization", []))
        text_encoder = getattr(model, "text_encoder", None)
        self.text_prompt = text_prompt if text_encoder is not None else None
        self.prompt = None
        if text_encoder is not None:
            if hasattr(model, "members"):  # each member has its own projection: bake the tokens
                self.prompt = text_encoder.fixed_tokens(text_prompt or "")
            else:  # one model: bake the encoded prompt itself, MiniLM never runs at the station
                self.prompt = FixedTextEncoding(text_encoder, text_prompt or "")

    @classmethod
    def for_batch(cls, model: nn.Module, batch: dict, settings: TaskSettings, class_names: Sequence[str] | None = None,
                  box_class_names: Sequence[str] | None = None) -> "DeployableModel":
        """The deployable module that evaluates ``batch``: frames at the batch's size (the training
        size: no resize), clouds of its size, ``settings``' views and decoding, no grade heatmap."""
        image, points = batch.get("image"), batch.get("points")
        return cls(model, tuple(image.shape[-2:]) if image is not None else (0, 0), channels=int(image.shape[1]) if image is not None else 1,
                   tta_views=settings.tta_views, class_names=class_names, box_class_names=box_class_names, top_k=settings.top_k,
                   num_points=int(points.shape[1]) if points is not None else 1, grasp_top_k=settings.grasp_top_k,
                   grasp_nms_radius=settings.grasp_nms_radius, grade_heatmap=False)

    # -- the decoders of the built-in tasks, by role (exporters and tests read their settings) --
    def _part(self, task: str, part: str) -> nn.Module | None:
        return getattr(self.decoders[task], part, None) if task in self.decoders else None

    @property
    def grade_decoder(self) -> GradeDecoder | None:
        return self._part("grading", "grades")

    @property
    def grade_heatmap_decoder(self) -> nn.Module | None:
        return self._part("grading", "heatmap")

    @property
    def box_decoder(self) -> nn.Module | None:
        return self._part("localization", "boxes")

    @property
    def grasp_decoder(self) -> nn.Module | None:
        return self._part("grasp", "grasps")

    # -- inputs and outputs ---------------------------------------------------------------
    def input_specs(self) -> list[TensorSpec]:
        """The inputs ``forward`` takes, in order."""
        specs = []
        if self.has_image:
            h, w = self.input_size
            specs.append(TensorSpec("image", "uint8", ("N", self.channels, h, w), "input", "camera frames, uint8, fixed size"))
        if self.num_points is not None:
            p = self.num_points
            specs += [
                TensorSpec("points", "float32", ("N", p, 3), "input",
                           "clouds in sensor metres after outlier removal and voxel downsampling, sampled or padded to P points; "
                           "centred and scaled inside the graph"),
                TensorSpec("point_mask", "bool", ("N", p), "input", "True for real points, False for padding (any values there)"),
            ]
            if self.point_features == "normals":
                specs.append(TensorSpec("point_normals", "float32", ("N", p, 3), "input",
                                        "unit normals estimated on the host (open3d), oriented toward the sensor at the origin"))
        return specs

    def input_spec(self) -> TensorSpec:
        """The first input (``image`` for image models)."""
        return self.input_specs()[0]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs()]

    def output_specs(self) -> list[TensorSpec]:
        return [spec for d in self.decoders.values() for spec in d.outputs()]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.output_specs()]

    # -- running ----------------------------------------------------------------------------
    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_specs()):
            raise ValueError(f"DeployableModel takes {self.input_names}, got {len(inputs)} tensors")
        return self.decode(*self.run_model(dict(zip(self.input_names, inputs))))

    def run_model(self, inputs: dict[str, Tensor], text: Any = None) -> tuple[Any, Tensor | None, Tensor | None]:
        """Named inputs (those of :meth:`input_specs` present) → preprocessing → the model: its raw
        ``InspectionOutput`` and the clouds' ``center`` (N, 3) and ``scale`` (N,) (None without clouds).
        ``text``: per-sample texts in place of the baked prompt (evaluating a model with a text
        encoder on its data's texts)."""
        x = like = None
        if self.has_image and "image" in inputs:
            x = self.preprocess(inputs["image"])
            if self.tta_views > 1:
                x = dihedral_views(x, self.tta_views)
            like = x
        kwargs: dict = {}
        center = scale = None
        if self.normalizer is not None and "points" in inputs:
            mask = inputs["point_mask"].to(torch.bool)
            points, center, scale = self.normalizer(inputs["points"], mask)
            kwargs = {"points": points, "point_mask": mask}
            if self.point_features == "normals":
                normals = inputs["point_normals"].float()
                kwargs["point_features"] = torch.where(mask.unsqueeze(-1), normals, torch.zeros_like(normals))
            like = points if like is None else like
        if self.prompt is not None:
            kwargs["text"] = repeat_views(text, self.tta_views) if text is not None else self.prompt(like)
        kwargs.update(self.model_options)
        out = self.model(x, **kwargs) if x is not None else self.model(**kwargs)
        return out, center, scale

    def decode(self, out, center: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor, ...]:
        """The model's raw ``InspectionOutput`` (of ``tta_views`` · N rows) → the outputs in
        :meth:`output_names` order; ``center`` (N, 3) and ``scale`` (N,) map grasps to sensor metres."""
        context = {"center": center, "scale": scale}
        return tuple(t for d in self.decoders.values() for t in d(out, context))

    def evaluate(self, inputs: dict[str, Tensor], text: Any = None) -> dict[str, Tensor]:
        """Named outputs of the named inputs a batch has (:func:`batch_inputs`): what validation and
        ``lineside test`` score. Tasks whose modality the batch lacks give no outputs."""
        out, center, scale = self.run_model(inputs, text)
        context = {"center": center, "scale": scale}
        named: dict[str, Tensor] = {}
        for d in self.decoders.values():
            if d.raw(out) is not None:
                named.update(zip((s.name for s in d.outputs()), d(out, context)))
        return named

    @torch.inference_mode()
    def run(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Eager convenience: named outputs as a dict."""
        return dict(zip(self.output_names, self(*inputs)))


def batch_inputs(batch: dict) -> dict[str, Tensor]:
    """A training batch → the deployable module's named inputs: its ``image`` (uint8 at the training
    size), its ``points`` back in sensor metres (``points · scale + center`` where the batch carries
    the normalisation; padding zeroed), ``point_mask`` and ``point_features`` as ``point_normals``."""
    named: dict[str, Tensor] = {}
    if "image" in batch:
        named["image"] = batch["image"]
    if "points" in batch:
        mask = batch["point_mask"].to(torch.bool)
        points = batch["points"].float()
        if "center" in batch and "scale" in batch:
            points = points * batch["scale"].float().view(-1, 1, 1) + batch["center"].float().unsqueeze(1)
        named["points"] = torch.where(mask.unsqueeze(-1), points, torch.zeros_like(points))
        named["point_mask"] = mask
        if batch.get("point_features") is not None:
            named["point_normals"] = batch["point_features"].float()
    return named
