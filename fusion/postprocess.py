"""Grade decoding, with dihedral test-time augmentation."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lineside.fusion.outputs import TensorSpec

__all__ = ["GradeDecoder", "GradePrediction", "GradePostprocessor", "dihedral_views", "predict_grades", "repeat_views"]


class GradePrediction(NamedTuple):
    """Decoded grades.

    Attributes:
        probs: (B, K) grade probabilities.
        grade: (B,) int64 most probable grade.
        confidence: (B,) its probability.
    """

    probs: Tensor
    grade: Tensor
    confidence: Tensor


class GradeDecoder(nn.Module):
    """Grade logits of ``V·N`` dihedral views → averaged probabilities and the decided grade
    (exported in every graph).

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


def dihedral_views(images: Tensor, n_views: int) -> Tensor:
    """(B, C, H, W) → (V·B, C, H, W): the first ``n_views`` of the 8 rotations/flips (square images)."""
    if n_views not in (1, 2, 4, 8):
        raise ValueError(f"tta views must be 1, 2, 4 or 8, got {n_views}")
    views = []
    for flip in (False, True):
        base = images.flip(-1) if flip else images
        for k in range(4):
            views.append(torch.rot90(base, k, dims=(-2, -1)))
    order = [0, 4, 2, 6, 1, 5, 3, 7][:n_views]  # identity, h-flip, 180°, … : most useful first
    return torch.cat([views[i] for i in order], dim=0)


class GradePostprocessor(nn.Module):
    """Runs the model (with ``tta_views`` dihedral views averaged in probability) and decodes grades.

    Args:
        model: an :class:`fusion.model.InspectionModel` (anything returning ``grade_logits``).
        tta_views: 1 (off), 2, 4 or 8 views; needs square inputs when > 1.
    """

    def __init__(self, model: nn.Module, tta_views: int = 1) -> None:
        super().__init__()
        self.model = model
        self.tta_views = tta_views

    def forward(self, image: Tensor) -> GradePrediction:
        return predict_grades(self.model, image, self.tta_views)


def repeat_views(text, n_views: int):
    """Per-sample text for ``n_views`` stacked views: a list repeats, token tensors (ids, mask) tile."""
    if text is None or n_views == 1:
        return text
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(t, Tensor) for t in text):
        return tuple(t.repeat(n_views, *([1] * (t.dim() - 1))) for t in text)
    return list(text) * n_views


def predict_grades(model: nn.Module, image: Tensor, tta_views: int = 1, text=None) -> GradePrediction:
    """Grade probabilities of ``model`` on (B, C, H, W) images (and per-sample ``text`` when the
    model has a text encoder), averaged over ``tta_views`` dihedral views."""
    b = image.shape[0]
    kwargs = {} if text is None else {"text": repeat_views(text, tta_views)}
    if tta_views > 1:
        logits = model(dihedral_views(image, tta_views), **kwargs).grade_logits
        probs = logits.softmax(-1).view(tta_views, b, -1).mean(0)
    else:
        probs = model(image, **kwargs).grade_logits.softmax(-1)
    confidence, grade = probs.max(-1)
    return GradePrediction(probs, grade, confidence)
