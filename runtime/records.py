"""A backend's named outputs → one result record per input, for every command that writes results.

``lineside score`` (images and point clouds) and ``lineside station`` build their records here, so
a file gets the same fields through every path. The outputs are read from the artefact's metadata
(its :class:`~lineside.fusion.outputs.TensorSpec` rows), one :class:`RecordField` per task the
model carries, found by output names and kinds, never by the model's class:

=================  ==========================================  ==============================================
field              outputs it reads                            record keys
=================  ==========================================  ==============================================
:class:`GradeField`  ``grade_probs``, ``grade``                 ``grade``, ``decision``, ``confidence``, ``probabilities``
:class:`NamedGradeField`  ``grade_probs_<q>``, ``grade_<q>``      ``grades``: ``{q: {"grade", "decision", "confidence", "probabilities"}}``
:class:`BoxField`    kinds ``box`` / ``box_score`` / ``box_label``  ``boxes``: ``[{"label", "score", "box"}]`` in the input's pixels
:class:`SegmentationField`  ``defect_masks``                    ``boxes`` (as above): one per connected region of a defect class
:class:`GraspField`  ``grasp_*``                                ``grasps``: ``[{"position", "approach", "closing", "width", "score"}]``
:class:`ExtraField`  any other small per-item output (≤ 64 values)  ``outputs``: ``{name: values}``
=================  ==========================================  ==============================================

A segmentation model's regions join the ``boxes`` of a localization head when a model has both.
Heatmaps, masks and other maps stay out of records (``score`` writes them as PNGs). A new task's outputs
land under ``outputs`` until it adds a field here (one class, one line in :class:`RecordBuilder`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from lineside.runtime.detections import BOX_SCORE_THRESHOLD, MaskLayout, OutputLayout, box_records
from lineside.vision.segmentation_regions import regions_to_boxes

__all__ = ["RecordField", "GradeField", "NamedGradeField", "BoxField", "SegmentationField", "GraspField", "ExtraField", "RecordBuilder", "score_row"]

GRASP_OUTPUTS = ("grasp_position", "grasp_approach", "grasp_closing", "grasp_width", "grasp_score")


class RecordField:
    """Part of a record made from some of the outputs. ``claims`` names the outputs it reads (so
    :class:`ExtraField` leaves them alone); :meth:`fill` adds its keys to one item's record."""

    claims: tuple[str, ...] = ()

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        raise NotImplementedError


class GradeField(RecordField):
    """``grade_probs`` (or the first float (N, K) output with K class names) and ``grade`` (or its argmax)."""

    def __init__(self, specs: list[dict], class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        names = [s["name"] for s in specs]
        self.probs = "grade_probs" if "grade_probs" in names else next(
            (s["name"] for s in specs if s.get("kind") == "float" and len(s.get("shape", [])) == 2
             and s["shape"][1] == len(self.class_names) and self.class_names), None)
        self.grade = "grade" if "grade" in names else None
        self.claims = tuple(n for n in (self.probs, self.grade) if n)

    @classmethod
    def of(cls, specs: list[dict], backend: Any) -> "GradeField | None":
        field = cls(specs, backend.class_names)
        return field if field.claims else None

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        probs = np.asarray(outputs[self.probs][j], dtype=np.float64) if self.probs else None
        grade = int(outputs[self.grade][j]) if self.grade else int(probs.argmax())
        record["grade"] = grade
        record["decision"] = self.class_names[grade] if 0 <= grade < len(self.class_names) else str(grade)
        if probs is not None:
            names = self.class_names if len(self.class_names) == len(probs) else [str(k) for k in range(len(probs))]
            record["probabilities"] = {name: round(float(p), 6) for name, p in zip(names, probs)}
            record["confidence"] = round(float(probs[grade] if grade < len(probs) else probs.max()), 6)


class NamedGradeField(RecordField):
    """The grades of named grading tasks (``grading/el``, ``grading/xray``: outputs ``grade_probs_el``,
    ``grade_el`` …), one entry each under ``grades``, keyed by the qualifier. Grade names come from
    the metadata's ``grade_class_names[q]`` (every export since it was added), else its
    ``class_names_<q>`` (as the checkpoint records them), else the grade indices (``"0"``, ``"1"`` …:
    an artefact exported before grade names were recorded per task)."""

    def __init__(self, specs: list[dict], metadata: dict) -> None:
        names = {s["name"] for s in specs}
        self.tasks = {n[len("grade_probs_"):]: (n, f"grade_{n[len('grade_probs_'):]}" if f"grade_{n[len('grade_probs_'):]}" in names else None)
                      for n in sorted(names) if n.startswith("grade_probs_")}
        recorded = metadata.get("grade_class_names") or {}
        self.class_names = {q: [str(n) for n in (recorded.get(q) or metadata.get(f"class_names_{q}") or [])] for q in self.tasks}
        shapes = {s["name"]: s.get("shape") or [] for s in specs}
        self.num_grades = {q: shapes[probs][1] if len(shapes[probs]) == 2 and isinstance(shapes[probs][1], int) else None
                           for q, (probs, _) in self.tasks.items()}
        self.claims = tuple(n for probs, grade in self.tasks.values() for n in (probs, grade) if n)

    def grade_names(self, q: str, k: int | None = None) -> list[str]:
        """The names task ``q``'s records give its ``k`` grades (default: as many as its output spec
        has): the recorded names when there are ``k`` of them, else the indices as text."""
        k = self.num_grades[q] if k is None else k
        if k is None:
            return list(self.class_names[q])
        return self.class_names[q] if len(self.class_names[q]) == k else [str(i) for i in range(k)]

    @classmethod
    def of(cls, specs: list[dict], backend: Any) -> "NamedGradeField | None":
        field = cls(specs, getattr(backend, "metadata", {}) or {})
        return field if field.tasks else None

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        grades = {}
        for q, (probs_name, grade_name) in self.tasks.items():
            probs = np.asarray(outputs[probs_name][j], dtype=np.float64)
            grade = int(outputs[grade_name][j]) if grade_name else int(probs.argmax())
            names = self.grade_names(q, len(probs))
            grades[q] = {"grade": grade, "decision": names[grade] if 0 <= grade < len(names) else str(grade),
                         "confidence": round(float(probs[grade] if grade < len(probs) else probs.max()), 6),
                         "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)}}
        record["grades"] = grades


class BoxField(RecordField):
    """Decoded boxes above ``threshold``, mapped from the model's input pixels to the item's own size."""

    def __init__(self, layout: OutputLayout, input_size: tuple[int, int], threshold: float) -> None:
        self.layout, self.input_size, self.threshold = layout, input_size, threshold
        self.claims = tuple(n for n in (layout.boxes, layout.scores, layout.labels) if n)

    @classmethod
    def of(cls, specs: list[dict], backend: Any, threshold: float) -> "BoxField | None":
        layout = OutputLayout.of(specs, backend.metadata.get("box_class_names"))
        return cls(layout, backend.input_size, threshold) if layout.has_boxes else None

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        lay = self.layout
        record["boxes"] = box_records(outputs[lay.boxes][j], outputs[lay.scores][j], outputs[lay.labels][j], lay.box_class_names,
                                      self.input_size, size or self.input_size, self.threshold)


class SegmentationField(RecordField):
    """Boxes of the connected regions in ``defect_masks``, in the item's own pixels, under ``boxes``.

    Each 8-connected region of cells whose class probability is at least ``mask_threshold``
    (:func:`~lineside.vision.segmentation_regions.regions_to_boxes`) becomes ``{"label", "score"
    (its mean probability), "box": [x1, y1, x2, y2]}``; structure classes (``busbar``) are left out,
    and so are regions scoring under ``threshold``. Boxes go from cells to training-size pixels
    (the stride) to the item's pixels (item size / training size), rounded to 0.1 px; they join any
    localization boxes already in the record, best first."""

    def __init__(self, layout: MaskLayout, threshold: float, mask_threshold: float = 0.5) -> None:
        self.layout, self.threshold, self.mask_threshold = layout, threshold, mask_threshold
        self.claims = (layout.name,)

    @classmethod
    def of(cls, specs: list[dict], backend: Any, threshold: float) -> "SegmentationField | None":
        layout = MaskLayout.of(specs, backend.metadata)
        return cls(layout, threshold) if layout is not None else None

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        lay = self.layout
        h0, w0 = size or lay.train_size
        sy, sx = lay.scale((h0, w0))
        regions = regions_to_boxes(outputs[lay.name][j], lay.stride, lay.class_names, self.mask_threshold,
                                   skip=lay.structure_classes)[0]
        boxes = []
        for r in regions:
            if not r["score"] >= self.threshold:
                continue
            x1, y1, x2, y2 = r["box"]
            box = [min(x1 * sx, w0), min(y1 * sy, h0), min(x2 * sx, w0), min(y2 * sy, h0)]
            boxes.append({"label": r["label"], "score": round(float(r["score"]), 4), "box": [round(float(v), 1) for v in box]})
        record["boxes"] = sorted([*record.get("boxes", []), *boxes], key=lambda b: -b["score"])


class GraspField(RecordField):
    """The ranked grasps of a point model (exhausted picks, score 0, left out)."""

    claims = GRASP_OUTPUTS

    @classmethod
    def of(cls, specs: list[dict], backend: Any) -> "GraspField | None":
        return cls() if "grasp_position" in {s["name"] for s in specs} else None

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        from lineside.export.point_inputs import grasps_from_outputs

        record["grasps"] = grasps_from_outputs(outputs, j) or []


class ExtraField(RecordField):
    """Every other small per-item output (at most 64 values), under ``outputs``; maps stay out."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def fill(self, record: dict, outputs: dict[str, np.ndarray], i: int, j: int, size: Sequence[int] | None) -> None:
        extra = {}
        for name in self.names:
            v = np.asarray(outputs[name][j])
            if v.size <= 64:
                extra[name] = np.round(v.astype(np.float64), 6).tolist() if v.dtype.kind == "f" else v.tolist()
        if extra:
            record["outputs"] = extra


class RecordBuilder:
    """A backend's outputs → records, one :class:`RecordField` per task found in its output specs.

    Args:
        backend: any :class:`~lineside.runtime.backend.Backend` (its ``output_specs``,
            ``class_names``, ``metadata`` and ``input_size``).
        box_threshold: boxes (and segmentation regions) scoring at least this go into the records.

    A record always has ``decision``, ``grade``, ``confidence`` and ``probabilities`` (None for a
    model without grades), then ``boxes`` / ``grasps`` / ``outputs`` when the model gives them.
    """

    def __init__(self, backend: Any, box_threshold: float = BOX_SCORE_THRESHOLD) -> None:
        specs = list(backend.output_specs)
        fields: list[RecordField] = [f for f in (GraspField.of(specs, backend), BoxField.of(specs, backend, box_threshold),
                                                 SegmentationField.of(specs, backend, box_threshold)) if f]
        claimed = {n for f in fields for n in f.claims}
        layout = OutputLayout.of(specs, backend.metadata.get("box_class_names"))
        rest = [s for s in specs if s["name"] not in claimed and s["name"] not in layout.names()]
        named = NamedGradeField.of(rest, backend)
        if named is not None:
            fields.insert(0, named)
            claimed |= set(named.claims)
            rest = [r for r in rest if r["name"] not in claimed]
        grade = GradeField.of(rest, backend)
        if grade is not None:
            fields.insert(0, grade)
            claimed |= set(grade.claims)
        self.fields = fields + [ExtraField([s["name"] for s in rest if s["name"] not in claimed])]
        self.class_names = list(backend.class_names)
        self.box_threshold = box_threshold

    @property
    def named_grades(self) -> dict[str, list[str]]:
        """``{q: grade names}`` of each named grading task (``grading/xray`` → ``"xray"``), the names its
        records use under ``grades`` (indices as text where the artefact records none); empty without."""
        field = next((f for f in self.fields if isinstance(f, NamedGradeField)), None)
        return {q: field.grade_names(q) for q in field.tasks} if field is not None else {}

    @property
    def box_class_names(self) -> list[str]:
        """The box labels' names (empty for a model without boxes)."""
        return next((list(f.layout.box_class_names) for f in self.fields if isinstance(f, BoxField)), [])

    @property
    def mask_layout(self) -> MaskLayout | None:
        """The ``defect_masks`` output of a segmentation model (None for other models)."""
        return next((f.layout for f in self.fields if isinstance(f, SegmentationField)), None)

    @property
    def has(self) -> set[str]:
        """Which fields the records carry: ``grade``, ``boxes`` (localization or segmentation), ``grasps``."""
        kinds = {GradeField: "grade", NamedGradeField: "grades", BoxField: "boxes", SegmentationField: "boxes", GraspField: "grasps"}
        return {kinds[type(f)] for f in self.fields if type(f) in kinds}

    def record(self, outputs: dict[str, np.ndarray], j: int, size: Sequence[int] | None = None) -> dict[str, Any]:
        """The record of output row ``j``; ``size``: the item's own (H, W), to give boxes in its pixels."""
        row: dict[str, Any] = {"decision": None, "grade": None, "confidence": None, "probabilities": None}
        for field in self.fields:
            field.fill(row, outputs, j, j, size)
        return row

    def __call__(self, outputs: dict[str, np.ndarray], n: int, sizes: Sequence[Sequence[int]] | None = None) -> list[dict]:
        """Records of ``n`` items (output rows 0..n-1)."""
        return [self.record(outputs, i, sizes[i] if sizes else None) for i in range(n)]


def score_row(record: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """A record → the columns of a ``lineside score`` results file: ``grade``, ``grade_name``,
    ``confidence``, ``p_<grade>`` (grading models); for each named grading task ``q`` (records'
    ``grades``) ``grade_<q>``, ``grade_name_<q>``, ``confidence_<q>``, ``p_<q>_<grade name>``;
    ``boxes`` as JSON (localization and segmentation models)."""
    row: dict[str, Any] = {}
    if record.get("grade") is not None:
        probs = record.get("probabilities") or {}
        row |= {"grade": record["grade"], "grade_name": record["decision"], "confidence": f"{record['confidence']:.6f}"}
        row |= {f"p_{n}": f"{probs.get(n, float('nan')):.6f}" for n in class_names}
    for q, g in (record.get("grades") or {}).items():
        row |= {f"grade_{q}": g["grade"], f"grade_name_{q}": g["decision"], f"confidence_{q}": f"{g['confidence']:.6f}"}
        row |= {f"p_{q}_{n}": f"{p:.6f}" for n, p in (g.get("probabilities") or {}).items()}
    if "boxes" in record:
        row["boxes"] = json.dumps(record["boxes"], separators=(",", ":"))
    return row
