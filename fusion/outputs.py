"""Named outputs: one :class:`TensorSpec` row per input or output tensor of a deployable model.

Decoders (``fusion``) declare the rows they add; ``export`` writes them into metadata and checks
parity by their ``kind``; ``runtime`` reads them to turn a backend's arrays into result records.
It lives here, below ``export``, so a head or decoder never imports the exporter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TensorSpec"]


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
        ranked_by: for candidates ranked best first along axis 1, the output holding their scores
            (grasps: ``grasp_score``): parity compares the top candidate (a decision), since the
            order of near-tied lower ranks is not one.
    """

    name: str
    dtype: str
    shape: tuple
    kind: str
    description: str = ""
    atol: float | None = None
    ranked_by: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        for key in ("atol", "ranked_by"):  # None: the precision's tolerance applies / not ranked
            if d[key] is None:
                del d[key]
        return d
