"""Where the image feature levels sit among the fused tokens, for the heads that fold them back
into maps (localization, query localization, the grade map).

The image encoder emits the tokens of each feature level in turn (``EncoderOutput.levels`` =
((h, w), …), finest first, the first h·w tokens are level 0 …); the fusion transformer keeps them
together at ``FusionOutput.spans["image"]``.
"""

from __future__ import annotations

from torch import Tensor

from lineside.fusion.fusion_transformer import FusionOutput

__all__ = ["Levels", "image_span", "level_slice", "level_tokens"]

Levels = tuple[tuple[int, int], ...]


def image_span(fused: FusionOutput, image) -> tuple[int, int, Levels]:
    """``(start, end, levels)``: the image tokens' span in ``fused.tokens`` and the (h, w) grid of
    each level of the image ``EncoderOutput``; a span that does not hold the levels' tokens raises."""
    start, end = fused.spans["image"]
    levels = tuple((int(h), int(w)) for h, w in image.levels)
    if sum(h * w for h, w in levels) != end - start:
        raise ValueError(f"image span {start}:{end} holds {end - start} tokens, levels {levels} give {sum(h * w for h, w in levels)}")
    return start, end, levels


def level_slice(levels: Levels, level_index: int) -> tuple[int, int, int]:
    """``(first, h, w)``: the offset of level ``level_index`` (negative counts from the coarsest)
    within the image tokens and its grid."""
    if not -len(levels) <= level_index < len(levels):
        raise IndexError(f"level_index {level_index} out of range for {len(levels)} image feature levels")
    li = level_index % len(levels)
    h, w = levels[li]
    return sum(hh * ww for hh, ww in levels[:li]), h, w


def level_tokens(fused: FusionOutput, image, level_index: int) -> tuple[Tensor, int, int]:
    """The fused tokens of one image feature level: ((B, h·w, D), h, w)."""
    start, _, levels = image_span(fused, image)
    first, h, w = level_slice(levels, level_index)
    return fused.tokens[:, start + first : start + first + h * w], h, w
