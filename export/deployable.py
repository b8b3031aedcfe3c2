"""DeployableModel: the one module every backend runs (eager torch, ONNX Runtime, AOTInductor, TensorRT).

    uint8 frames (N, C, H, W) → FramePreprocessor (resize to the training size, inside)
        → InspectionModel / InspectionEnsemble (normalisation inside the image encoder)
        → decoders (test-time views folded in) → named outputs

    padded clouds (N, P, 3) in sensor metres + point_mask (N, P) [+ point_normals (N, P, 3)]
        → CloudNormalizer (centre and scale as in training, inside) → InspectionModel
        → GraspDecoder (top-K with 3-D NMS, back to sensor metres) → named outputs

Inputs are listed as :class:`TensorSpec` rows too (:meth:`DeployableModel.input_specs`): ``image``
for a model with an image encoder, ``points`` / ``point_mask`` (/ ``point_normals`` when the point
encoder takes normals as features) for one with a point encoder, both for an image + point model;
``forward`` takes them positionally in that order.

Outputs are listed as :class:`TensorSpec` rows (name, dtype, shape, kind). A new head adds a
decoder with its own rows; metadata, the parity check, Triton configs and the station read
the rows, never a hard-coded list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from lineside.export.checkpoint import LoadedModel
from lineside.fusion.box_decoder import BoxDecoder
from lineside.fusion.grade_heatmap import GradeHeatmapDecoder, grade_heatmap_grid
from lineside.fusion.grasp_decoder import GraspDecoder
from lineside.fusion.postprocess import dihedral_views
from lineside.pointcloud.cloud_normalizer import CloudNormalizer
from lineside.vision.preprocess import FramePreprocessor

__all__ = ["TensorSpec", "GradeDecoder", "DeployableModel", "build_deployable", "parse_size"]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a deployable model.

    Attributes:
        name: tensor name in every artefact (ONNX, TensorRT, Triton).
        dtype: numpy dtype name (``uint8``, ``float32``, ``int64``).
        shape: dims, ``"N"`` for the dynamic batch axis.
        kind: ``"float"`` (compared by max |Δ| in parity checks), ``"decoded"`` (discrete
            decisions, compared by agreement), ``"box"`` / ``"box_score"`` / ``"box_label"``
            (detections, compared as matched boxes: :mod:`export.parity`), ``"heatmap"`` (a float
            map normalised to its peak, compared by max |Δ| at the precision's ``heatmap_atol``)
            or ``"input"``.
        description: what it holds.
        atol: parity tolerance of a float output in its own units, when the precision's default
            does not fit them (grasp positions in metres: 1 mm); the larger of the two applies.
    """

    name: str
    dtype: str
    shape: tuple
    kind: str
    description: str = ""
    atol: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["atol"] is None:  # the precision's tolerance applies
            del d["atol"]
        return d


class GradeDecoder(nn.Module):
    """Grade logits of ``V·N`` dihedral views → averaged probabilities and the decided grade.

    Shapes:
        forward: logits (V·N, K) → (grade_probs (N, K) float32, grade (N,) int64).
    """

    def __init__(self, num_grades: int, tta_views: int = 1) -> None:
        super().__init__()
        self.num_grades = num_grades
        self.tta_views = tta_views

    def outputs(self) -> list[TensorSpec]:
        k = self.num_grades
        return [
            TensorSpec("grade_probs", "float32", ("N", k), "float", "severity grade probabilities (decision offsets folded in)"),
            TensorSpec("grade", "int64", ("N",), "decoded", "decided grade index (argmax of grade_probs)"),
        ]

    def forward(self, grade_logits: Tensor) -> tuple[Tensor, Tensor]:
        probs = grade_logits.float().softmax(-1)
        if self.tta_views > 1:
            probs = probs.reshape(self.tta_views, -1, probs.shape[-1]).mean(0)
        return probs, probs.argmax(-1)


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

    Decoders follow the model's heads: a :class:`GradeDecoder` when it has a grading head, then a
    :class:`BoxDecoder` when it has a localization head, then a :class:`GraspDecoder` when it has a
    grasp head; the outputs are the concatenation of their rows, in that order.

    Args:
        model: an ``InspectionModel`` or ``InspectionEnsemble`` (returns ``grade_logits`` and/or
            ``localization``).
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
        float32 (when the point encoder takes normals) → (grade_probs (N, K) float32, grade (N,)
        int64[, grade_heatmap (N, 1, h, w)]) with a grading head, then (boxes (N, k, 4), box_scores (N, k), box_labels (N, k)
        int64, defect_heatmap (N, 1, h, w)) with a localization head, then (grasp_position
        (N, K, 3), grasp_approach (N, K, 3), grasp_closing (N, K, 3), grasp_width (N, K),
        grasp_score (N, K)) in sensor metres with a grasp head.
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
        self.has_image = not hasattr(model, "image_encoder") or model.image_encoder is not None  # ensembles: image models
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
        self.class_names = list(class_names or [str(i) for i in range(model.num_grades)])
        self.grade_decoder = GradeDecoder(model.num_grades, tta_views) if model.num_grades > 0 else None
        self.grade_heatmap_decoder = None
        first = model.members[0] if hasattr(model, "members") else model
        image_encoder = getattr(first, "image_encoder", None)
        if grade_heatmap and self.grade_decoder is not None and image_encoder is not None \
                and hasattr(getattr(first, "grading_head", None), "grade_map"):
            self.grade_heatmap_decoder = GradeHeatmapDecoder(grade_heatmap_grid(image_encoder, self.train_size), tta_views)
        head = getattr(model, "localization_head", None)
        self.box_decoder = None
        self.box_class_names = list(box_class_names or [])
        if head is not None:
            stride = float(model.image_encoder.strides[head.level_index])
            if hasattr(head, "decoder"):  # the head's own decoder (the query head's: top-K over query-class pairs)
                self.box_decoder = head.decoder(stride, self.train_size, self.input_size, top_k=top_k, tta_views=tta_views)
            else:
                cells = head.num_classes * -(-self.train_size[0] // int(stride)) * -(-self.train_size[1] // int(stride))
                self.box_decoder = BoxDecoder(stride, self.train_size, self.input_size, min(top_k, cells), tta_views=tta_views)
            self.box_class_names = self.box_class_names or [str(i) for i in range(head.num_classes)]
        self.grasp_decoder = GraspDecoder(grasp_top_k, grasp_nms_radius) if getattr(model, "grasp_head", None) is not None else None
        if self.grade_decoder is None and self.box_decoder is None and self.grasp_decoder is None:
            raise ValueError("the model has no grading, localization or grasp head: nothing to deploy")
        text_encoder = getattr(model, "text_encoder", None)
        self.text_prompt = text_prompt if text_encoder is not None else None
        self.prompt = None
        if text_encoder is not None:
            if hasattr(model, "members"):  # each member has its own projection: bake the tokens
                self.prompt = text_encoder.fixed_tokens(text_prompt or "")
            else:  # one model: bake the encoded prompt itself, MiniLM never runs at the station
                self.prompt = FixedTextEncoding(text_encoder, text_prompt or "")

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
        decoders = (self.grade_decoder, self.grade_heatmap_decoder, self.box_decoder, self.grasp_decoder)
        return [spec for d in decoders if d is not None for spec in d.outputs()]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.output_specs()]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_specs()):
            raise ValueError(f"DeployableModel takes {self.input_names}, got {len(inputs)} tensors")
        named = dict(zip(self.input_names, inputs))
        x = like = None
        if self.has_image:
            x = self.preprocess(named["image"])
            if self.tta_views > 1:
                x = dihedral_views(x, self.tta_views)
            like = x
        kwargs: dict = {}
        center = scale = None
        if self.normalizer is not None:
            mask = named["point_mask"].to(torch.bool)
            points, center, scale = self.normalizer(named["points"], mask)
            kwargs = {"points": points, "point_mask": mask}
            if self.point_features == "normals":
                normals = named["point_normals"].float()
                kwargs["point_features"] = torch.where(mask.unsqueeze(-1), normals, torch.zeros_like(normals))
            like = points if like is None else like
        if self.prompt is not None:
            kwargs["text"] = self.prompt(like)
        if self.grade_heatmap_decoder is not None:
            kwargs["grade_map"] = True
        out = self.model(x, **kwargs) if x is not None else self.model(**kwargs)
        return self.decode(out, center, scale)

    def decode(self, out, center: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor, ...]:
        """The model's raw ``InspectionOutput`` (of ``tta_views`` · N rows) → the outputs in
        :meth:`output_names` order; ``center`` (N, 3) and ``scale`` (N,) map grasps to sensor metres."""
        outputs: tuple[Tensor, ...] = ()
        if self.grade_decoder is not None:
            outputs += tuple(self.grade_decoder(out.grade_logits))
        if self.grade_heatmap_decoder is not None:
            outputs += (self.grade_heatmap_decoder(out.grade_map, outputs[0]),)
        if self.box_decoder is not None:
            outputs += tuple(self.box_decoder(out.localization))
        if self.grasp_decoder is not None:
            outputs += tuple(self.grasp_decoder.decode(out.grasp, center, scale))
        return outputs

    @torch.inference_mode()
    def run(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Eager convenience: named outputs as a dict."""
        return dict(zip(self.output_names, self(*inputs)))


def parse_size(text: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """``"300"`` / ``"300x200"`` (H×W) / 300 / (300, 200) → (H, W); None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return (text, text)
    if isinstance(text, str):
        parts = text.lower().replace("×", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"input size {text!r}: use H or HxW in pixels, e.g. 300x300") from None
    else:
        vals = [int(v) for v in text]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 16:
        raise ValueError(f"input size {text!r}: use H or HxW, each at least 16 px")
    return (vals[0], vals[1])


def build_deployable(loaded: LoadedModel, input_size: Sequence[int] | str | None = None, tta_views: int | None = None,
                     text_prompt: str | None = None) -> DeployableModel:
    """The deployable module of a loaded checkpoint (eval mode, on the CPU).

    A model with a point encoder takes the checkpoint's recorded ``num_points`` (its ``points``
    preprocessing record) and runs one view."""
    train = (loaded.image_size, loaded.image_size)
    size = parse_size(input_size) if not isinstance(input_size, tuple) else input_size
    points = dict(getattr(loaded, "points", None) or {})
    if getattr(loaded.model, "point_encoder", None) is not None:
        tta_views = 1
    return DeployableModel(
        loaded.model.eval(),
        train_size=train,
        input_size=size,
        channels=loaded.channels,
        tta_views=loaded.tta_views if tta_views is None else tta_views,
        class_names=loaded.class_names,
        text_prompt=text_prompt,
        box_class_names=getattr(loaded, "box_class_names", None),
        num_points=int(points.get("num_points") or 1024),
        grasp_top_k=int(points.get("grasp_top_k") or 5),
        grasp_nms_radius=float(points.get("grasp_nms_radius") or 0.01),
    ).eval()
