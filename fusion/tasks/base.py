"""Task: the contract every inspection task fulfils (head, criterion, exportable decoder, metrics, named outputs).

A task is one unit. The model (:class:`~lineside.fusion.model.InspectionModel`), the LightningModule,
the deployable module and the result records loop over the tasks present and call only what is
declared here; none of them has an ``if`` per head.

=================  ==========================================================================
model side         :meth:`Task.run` (the head on the fused sequence), :meth:`Task.explain`
                   (extra maps on request), :meth:`Task.raw` (its raw output in an
                   ``InspectionOutput``)
training           :meth:`Task.criterion` (a ``weight_dict`` criterion), :meth:`Task.loss` (on the
                   samples that carry its labels only), :meth:`Task.configure` (the data module
                   fits the head; class weights, label names)
deployment         :meth:`Task.decoder` (a :class:`TaskDecoder`: fixed shapes, inside every
                   exported graph, named :class:`TensorSpec` outputs)
evaluation         :meth:`Task.metrics` (torchmetrics, registered by the LightningModule),
                   :meth:`Task.update` (from the *decoded* outputs), :meth:`Task.compute`,
                   :meth:`Task.report`; :meth:`Task.predictions` for ``lineside predict``
=================  ==========================================================================

Tasks may repeat under names (``grading/el``, ``grading/xray``), each with its own head, label
space and outputs. The task named like its kind (``grading``) reads its labels from the batch key
(``grade``), names its outputs plainly (``grade_probs``) and logs ``val/acc``; the built-in ones
take their heads from the model's slots (``grading_head``) and put their raw outputs in
``InspectionOutput`` fields (``grade_logits``), any other from ``InspectionModel(heads=...)`` into
``InspectionOutput.extra[name]``. A named task ``grading/xray`` reads labels ``grade/xray`` (its other
target keys suffixed the same way: ``boxes/xray``, ``labels/xray`` …), outputs ``grade_probs_xray``
and logs ``val/grading/xray/acc``. A sample without a task's labels adds nothing to that task's
loss or metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from lineside.fusion.outputs import TensorSpec

__all__ = ["Task", "TaskDecoder", "TaskSettings"]


@dataclass(frozen=True)
class TaskSettings:
    """How tasks decode and evaluate (one set per deployable module / LightningModule).

    Attributes:
        train_size: (H, W) the model sees; None where no image is decoded (point-only models).
        input_size: (H, W) of the frames the deployable takes; default ``train_size``.
        tta_views: dihedral test-time views stacked on the batch (1 = off).
        top_k: boxes per frame (localization).
        grasp_top_k / grasp_nms_radius: grasps per cloud and their 3-D NMS radius in metres (grasp).
        grade_heatmap: a grading task on images also returns ``grade_heatmap``.
        coverage_radius: radius in metres of the grasp coverage metric.
    """

    train_size: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    tta_views: int = 1
    top_k: int = 100
    grasp_top_k: int = 5
    grasp_nms_radius: float = 0.01
    grade_heatmap: bool = True
    coverage_radius: float = 0.02

    def at(self, train_size: Sequence[int], input_size: Sequence[int] | None = None) -> "TaskSettings":
        """These settings for frames of ``train_size`` (and ``input_size``)."""
        size = (int(train_size[0]), int(train_size[1]))
        return replace(self, train_size=size, input_size=tuple(int(v) for v in (input_size or size)))


class TaskDecoder(nn.Module):
    """A task's exportable decoding: its raw output, picked from the model's ``InspectionOutput``,
    → its named outputs (fixed shapes; runs inside every exported graph).

    Subclasses implement :meth:`specs` (the rows, plain names) and :meth:`decode`. ``context``
    holds what the deployable module computed before the model (``center`` (N, 3) and ``scale``
    (N,) of the cloud normalisation, None without clouds). ``model_options`` are keyword
    arguments the model needs for this decoder (``{"grade_map": True}``).

    Args:
        source: the ``InspectionOutput`` field, or the task name in ``InspectionOutput.extra``.
        suffix: appended to every output name of a named task (``"_xray"``); ``""`` otherwise.
    """

    model_options: dict[str, Any] = {}

    def __init__(self, source: str, suffix: str = "") -> None:
        super().__init__()
        self.source = source
        self.suffix = suffix

    def raw(self, out) -> Any:
        return out.task_output(self.source)

    def specs(self) -> list[TensorSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, raw: Any, context: dict[str, Tensor | None]) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def outputs(self) -> list[TensorSpec]:
        """The named outputs, in :meth:`forward` order."""
        return [replace(s, name=s.name + self.suffix) for s in self.specs()] if self.suffix else self.specs()

    def forward(self, out, context: dict[str, Tensor | None]) -> tuple[Tensor, ...]:
        return tuple(self.decode(self.raw(out), context))


class Task:
    """One task of a model: a head bound to its criterion, decoder, metrics and outputs.

    Subclasses set the class attributes and implement :meth:`criterion`, :meth:`decoder`,
    :meth:`metrics`, :meth:`update` and :meth:`compute`; the rest has working defaults.

    Class attributes:
        kind: what it does (``"grading"``); the unnamed task of a model has this name.
        head_type: the head class this task drives (how the model finds a head's task).
        slot: the ``InspectionModel`` argument of a built-in task's head (``"grading_head"``); None for
            the others, whose heads come in ``InspectionModel(heads={name: head})``.
        field: the ``InspectionOutput`` field of a built-in task's raw output; None for the others,
            whose raw outputs sit in ``InspectionOutput.extra[name]``.
        modality: the encoder output its head reads (``"image"``, ``"points"``), None for the
            fused sequence alone; the head runs only when that modality is in the batch.
        label_key: the batch key whose presence means "this batch supervises the task".
        target_keys: further batch keys its criterion and metrics read (suffixed with the label key
            for a named task).
        data_hint: what a data module for this task carries (error messages).
        output_names: the outputs its decoder may give (plain names).
        progress: metric names shown in the progress bar.

    Args:
        model: the model (or ensemble) the head belongs to (strides, image encoder).
        head: the head module.
        name: the task name; default ``kind``.
    """

    kind: ClassVar[str]
    head_type: ClassVar[type]
    slot: ClassVar[str | None] = None
    field: ClassVar[str | None] = None
    modality: ClassVar[str | None] = None
    label_key: ClassVar[str]
    target_keys: ClassVar[tuple[str, ...]] = ()
    data_hint: ClassVar[str] = "labels"
    output_names: ClassVar[tuple[str, ...]] = ()
    progress: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, head: nn.Module, name: str | None = None) -> None:
        self.model = model
        self.head = head
        self.name = name or self.kind
        self.qualified = self.name != self.kind
        qualifier = self.name.split("/", 1)[-1] if self.qualified else ""
        self.qualifier = qualifier
        self.source = self.field if self.field and not self.qualified else self.name
        self.suffix = "_" + qualifier.replace("/", "_") if self.qualified else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {type(self.head).__name__})"

    # -- model side ------------------------------------------------------------------------
    def run(self, fused, encoded: dict) -> Any:
        """The head's raw output, None when its modality is not in ``encoded``."""
        if self.modality is None:
            return self.head(fused)
        if self.modality not in encoded:
            return None
        return self.head(fused, encoded[self.modality])

    def explain(self, fused, encoded: dict) -> dict[str, Tensor]:
        """Extra ``InspectionOutput`` fields on request (``forward(..., grade_map=True)``)."""
        return {}

    def raw(self, out) -> Any:
        """This task's raw output in an ``InspectionOutput`` (None when its head did not run)."""
        return out.task_output(self.source)

    # -- labels ----------------------------------------------------------------------------
    def batch_key(self, key: str) -> str:
        """Where this task's ``key`` sits in a batch (``grade`` or, named, ``grade/xray``)."""
        return f"{key}/{self.qualifier}" if self.qualified else key

    def supervised(self, batch: dict) -> bool:
        """Does the batch carry this task's labels?"""
        return self.batch_key(self.label_key) in batch

    def labelled(self, batch: dict) -> bool:
        """Does any sample of a batch that carries this task's labels have one (a batch of ``grade = -1``
        cells from another data set does not)? Its zero loss still enters the total (it reaches the
        head), but it is not logged and weighs in no task weighting."""
        return True

    def targets(self, batch: dict) -> dict:
        """The batch in its criterion's vocabulary (a named task's suffixed keys under plain names)."""
        if not self.qualified:
            return batch
        out = dict(batch)
        for key in (self.label_key, *self.target_keys):
            out.pop(key, None)
            if self.batch_key(key) in batch:
                out[key] = batch[self.batch_key(key)]
        return out

    def label_names(self) -> list[str]:
        """Default label names (index order) until a data module gives its own."""
        return []

    def metric_key(self, stage: str, name: str) -> str:
        """Logged name of a metric: ``val/acc``, or ``val/grading/xray/acc`` for a named task."""
        return f"{stage}/{self.name}/{name}" if self.qualified else f"{stage}/{name}"

    def output_name(self, base: str) -> str:
        """The deployable output name of one of this task's outputs (``grade_probs`` → ``grade_probs_xray``)."""
        return base + self.suffix

    # -- training --------------------------------------------------------------------------
    def criterion(self) -> nn.Module:  # pragma: no cover - abstract
        """The default criterion: ``criterion(raw, targets)`` → dict of weighted terms and ``loss``."""
        raise NotImplementedError

    def loss(self, criterion: nn.Module, out, batch: dict) -> dict[str, Tensor] | None:
        """Loss terms (with ``loss``, their weighted sum) of a batch that carries this task's labels
        and gave its modality; None otherwise (the task adds no loss)."""
        raw = self.raw(out)
        if raw is None or not self.supervised(batch):
            return None
        terms = criterion(raw, self.targets(batch))
        if not self.qualified:
            return terms
        return {(k if k == "loss" else f"{self.name}/{k}"): v for k, v in terms.items()}

    def configure(self, datamodule, stage: str, criterion: nn.Module, metrics: Sequence[nn.Module]) -> list[str] | None:
        """Check that the data module fits the head and take what the task needs from it (class
        weights at fit start, the gripper …). Returns its label names, or None to keep them."""
        return None

    # -- deployment ------------------------------------------------------------------------
    def decoder(self, settings: TaskSettings) -> TaskDecoder:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------------------
    def metrics(self, settings: TaskSettings) -> nn.Module:  # pragma: no cover - abstract
        """Fresh metric state (torchmetrics) for one stage."""
        raise NotImplementedError

    def update(self, metrics: nn.Module, decoded: dict[str, Tensor], batch: dict) -> None:  # pragma: no cover - abstract
        """Accumulate one batch: the deployable module's decoded outputs against the batch's labels."""
        raise NotImplementedError

    def compute(self, metrics: nn.Module, stage: str, label_names: Sequence[str]) -> dict[str, Any]:  # pragma: no cover
        """The stage's metric values by plain name (``acc``, ``map_50`` …); empty when nothing was seen."""
        raise NotImplementedError

    def report(self, metrics: nn.Module, label_names: Sequence[str], log_dir: str | None) -> None:
        """Test-end report beyond the logged values (a confusion matrix …); none by default."""

    def checkpoint_record(self, datamodule, settings: TaskSettings) -> dict[str, Any]:
        """What a checkpoint records for this task under ``checkpoint["lineside"]`` (plain values); none by default."""
        return {}

    def predictions(self, decoded: dict[str, Tensor]) -> dict[str, Tensor]:
        """This task's decoded outputs for ``lineside predict`` (by output name)."""
        names = (self.output_name(base) for base in self.output_names)
        return {n: decoded[n] for n in names if n in decoded}
