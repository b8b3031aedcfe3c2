"""The deployable module of a checkpoint: :func:`build_deployable` (a :class:`~lineside.export.checkpoint.LoadedModel`
→ :class:`~lineside.fusion.deployable.DeployableModel`) and :func:`parse_size`.

The module class lives in :mod:`lineside.fusion.deployable` (the LightningModule evaluates with it);
its names are re-exported here for the exporters and older imports.
"""

from __future__ import annotations

from typing import Sequence

from lineside.export.checkpoint import LoadedModel
from lineside.fusion.deployable import DeployableModel, FixedTextEncoding, GradeDecoder, TensorSpec

__all__ = ["TensorSpec", "GradeDecoder", "DeployableModel", "FixedTextEncoding", "build_deployable", "parse_size"]


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
