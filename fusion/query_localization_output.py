"""QueryLocalizationOutput: the raw outputs of the query localization head.

Its own file because the head, its criterion and its decoder all read it, and the head builds
the other two (``criterion()`` / ``decoder()``): the type sits below all three.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["QueryLocalizationOutput"]


class QueryLocalizationOutput(NamedTuple):
    """Raw outputs of :class:`~lineside.fusion.query_localization_head.QueryLocalizationHead`
    (Q queries, T image tokens, L decoder layers).

    Attributes:
        logits: (B, Q, C) per-class logits of the last decoder layer (sigmoid, no "no-object").
        boxes: (B, Q, 4) normalised ``(cx, cy, w, h)`` of the last decoder layer.
        defect: (B, 1, h, w) class-agnostic defect heatmap logits on the ``level_index`` grid.
        aux_logits: (L-1, B, Q, C) logits of the earlier decoder layers.
        aux_boxes: (L-1, B, Q, 4) boxes of the earlier decoder layers.
        enc_logits: (B, T, C) per-token logits of the two-stage query selection ((B, 0, C) without it).
        enc_boxes: (B, T, 4) per-token boxes of the query selection ((B, 0, 4) without it).
    """

    logits: Tensor
    boxes: Tensor
    defect: Tensor
    aux_logits: Tensor
    aux_boxes: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
