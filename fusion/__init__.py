"""lineside.fusion: fusion transformer, task heads, criterion, postprocessing, the pure
:class:`InspectionModel`, its LightningModule and DataModule.

Composes ``vision`` (and, later, ``pointcloud``); never imports ``export``.
"""

from lineside.fusion.criterion import GradingCriterion
from lineside.fusion.fusion_transformer import FusionOutput, FusionTransformer
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.model import InspectionModel, InspectionOutput
from lineside.fusion.postprocess import GradePostprocessor, GradePrediction, predict_grades
from lineside.fusion.text_encoder import FixedTextTokens, TextEncoder

__all__ = [
    "FixedTextTokens",
    "FusionOutput",
    "FusionTransformer",
    "GradePostprocessor",
    "GradePrediction",
    "GradingCriterion",
    "GradingHead",
    "InspectionModel",
    "InspectionOutput",
    "TextEncoder",
    "predict_grades",
]
