"""lineside.fusion.tasks: one module per task, and the one registration that makes a head's task known.

A model finds the task of each of its heads here (:func:`task_for`): the first registered type
whose ``head_type`` the head is an instance of, else, for a head in a model slot, the first type
of the slot's kind. Adding a task = its module (head, criterion, decoder, metrics: see
``docs/adding_a_task.md``) + one line in :data:`TASK_TYPES`.
"""

from __future__ import annotations

from torch import nn

from lineside.fusion.tasks.base import Task, TaskDecoder, TaskSettings
from lineside.fusion.tasks.grading import GradingTask
from lineside.fusion.tasks.grasp import GraspTask
from lineside.fusion.tasks.localization import CenterNetLocalizationTask, LocalizationTask, QueryLocalizationTask
from lineside.fusion.tasks.segmentation import SegmentationTask

__all__ = [
    "TASK_TYPES",
    "CenterNetLocalizationTask",
    "GradingTask",
    "GraspTask",
    "LocalizationTask",
    "QueryLocalizationTask",
    "SegmentationTask",
    "Task",
    "TaskDecoder",
    "TaskSettings",
    "task_for",
    "task_type",
]

# the registration: one line per task type, in output order
TASK_TYPES: tuple[type[Task], ...] = (
    GradingTask,
    CenterNetLocalizationTask,
    QueryLocalizationTask,
    GraspTask,
    SegmentationTask,
)


def task_type(kind: str) -> type[Task]:
    """The first registered task type of ``kind`` (``"grading"``, ``"localization"`` …)."""
    for cls in TASK_TYPES:
        if cls.kind == kind:
            return cls
    raise KeyError(f"no task of kind {kind!r}; registered: {sorted({c.kind for c in TASK_TYPES})}")


def task_for(model: nn.Module, name: str, head: nn.Module) -> Task:
    """The task named ``name`` (``kind`` or ``kind/qualifier``) driving ``head`` of ``model``."""
    kind = name.split("/", 1)[0]
    cls = next((c for c in TASK_TYPES if isinstance(head, c.head_type)), None) or task_type(kind)
    if cls.kind != kind:
        raise ValueError(f"task {name!r} got a {type(head).__name__}, which is a {cls.kind} head")
    return cls(model, head, name)
