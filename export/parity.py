"""Parity: does an exported artefact give what the trained model gives, on real inputs?

Every output listed in the metadata is compared, **decisions first**: what the line acts on
must not change, floats may move by what the artefact's precision explains.

Decisions
    ``decoded`` outputs (grades …) by the share of items that agree; boxes (kinds ``box``,
    ``box_score``, ``box_label``) as matched detections; ranked candidates (a float output whose
    spec names ``ranked_by``, e.g. grasps ranked by ``grasp_score``) by their top item. A flip
    between near-tied alternatives is not a decision change: a decoded item that differs where
    the reference's top two values of its float source (the output whose argmax it is, e.g.
    ``grade_probs`` for ``grade``) lie within twice that output's limit, and a top item that
    matches another reference candidate scoring within twice the score's limit of the best,
    count as agreeing. Boxes: every box scoring at least ``box_score`` (either side) needs a box
    of the same label within the corner limit on the other side (row ``boxes``, metric
    ``matched``); the sorted labels above ``box_score`` must agree per frame (row ``box_labels``).
Floats
    max |Δ| against a limit derived from the precision's unit roundoff ``u`` and the output's
    scale ``s`` (its largest |value| in the reference: ≤ 1 for probabilities and peak-normalised
    heatmaps, the frame size for box corners in pixels, metres for positions)::

        limit = max(floor, factor[kind] · u · s, the output's own atol)

    An output's own ``atol`` (its spec, in its units: grasp positions 1 mm) is a floor, never a
    ceiling. At reduced precision (fp16, bf16, int8) a float row above its limit but within
    ``slack`` × limit still passes when every decision row passes (the detail says so): only
    float differences far beyond what the precision explains fail an export whose decisions
    hold. fp32 has no slack: a fp32 artefact must match to float noise. A limit set with
    ``--parity-tolerance`` is taken as given (no slack).

The table (:data:`TOLERANCES`, :data:`FLOAT_FACTORS`; a test keeps the two in step)::

    precision  u               decisions  floor  float ·32·u·s  heatmap ·256·u·s  box corners ·16·u·s  slack
    fp32       2^-24 = 6.0e-8  100 %      1e-4   1e-4           1e-4              0.5 px               1×
    fp16       2^-11 = 4.9e-4  ≥ 98 %     1e-4   1.6e-2·s       1.3e-1·s          max(0.5, 7.8e-3·s)   2×
    bf16       2^-8  = 3.9e-3  ≥ 95 %     1e-4   1.2e-1·s       1.0·s             max(0.5, 6.2e-2·s)   2×
    int8       1/254 = 3.9e-3  ≥ 90 %     1e-4   1.3e-1·s       1.0·s             max(0.5, 6.3e-2·s)   2×

``float`` covers probabilities (``grade_probs``, ``box_scores``, ``defect_heatmap``,
``grasp_score``), positions, directions and widths. ``heatmap`` is a map normalised to its own
peak (``grade_heatmap``: the excess of nearly uniform class-activation shares over their mean,
divided by its largest cell), a small difference of large numbers whose roundoff the
normalisation amplifies: fp16 is checked at 1.3e-1·s, while at bf16 and INT8 the limit reaches
the map's own range (only non-finite values fail; the decisions gate the export). INT8's ``u``
is half a step of a symmetric 8-bit grid over the tensor's range. ``s`` ≤ 1 makes a limit
tighter: probabilities that stay small move by less.

Measured on 64 ELPV val-block cells with the model of the ``trained_elpv_ckpt`` test fixture (a
grading model trained 240 steps at 80 px), max |Δ| against eager torch: fp16 ``grade_probs``
7.1e-3 (limit 1.4e-2), ``grade_heatmap`` 0.20 (limit 0.12: passes within 2×, every grade the
same); INT8 Q/DQ ``grade_probs`` 0.23 (limit 0.12: within 2×, 61 of 64 grades the same, 2 of the
3 others near ties), ``grade_heatmap`` 0.57; INT8 QOperator ``grade_probs`` 0.092; fp32 ``grade_probs`` 1.9e-6.

Overrides (``lineside export <format> --parity-tolerance``, builders' ``tolerance=``), comma
separated, see :func:`parse_tolerance`::

    --parity-tolerance 2                          every derived float and box-corner limit × 2
    --parity-tolerance grade_probs=0.02,heatmap=0.2   max |Δ| of an output, or of every output of a kind
    --parity-tolerance grade=0.9,agreement=0.95   a decision row's minimum share / every decision row's
    --parity-tolerance box_px=2                   box corners within 2 px
    --parity-tolerance grasp_position=0.002       a ranked output's top candidate within 2 mm (its units;
                                                  its minimum share of frames comes from agreement=)

A new head adds rows to the metadata (with ``kind``, ``atol``, ``ranked_by``), never code here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

__all__ = [
    "ParityRow",
    "ParityReport",
    "ParityReference",
    "Verifier",
    "Tolerance",
    "TOLERANCES",
    "FLOAT_FACTORS",
    "TOLERANCE_FLAG",
    "check_parity",
    "compare_outputs",
    "parse_tolerance",
    "tolerance_for",
]

TOLERANCE_FLAG = "--parity-tolerance"
SKIP_FLAG = "--parity-images 0"

# limit = factor · u · s per output kind (kinds not listed: "float")
FLOAT_FACTORS: dict[str, float] = {"float": 32.0, "box_score": 32.0, "heatmap": 256.0, "box": 16.0}
_SPECIAL_KEYS = ("factor", "agreement", "box_px")


@dataclass(frozen=True)
class Tolerance:
    """Pass limits of one precision (see the module table).

    Attributes:
        atol: floor of every float limit (fp32's whole limit).
        min_agreement: decision rows: minimum share of items (frames, boxes) that agree.
        box_px: floor of the box-corner limit, pixels.
        box_score: boxes are compared from this score up.
        unit_roundoff: ``u`` of the precision; float limits are ``FLOAT_FACTORS[kind] · u · s``.
        slack: a float row within ``slack`` × its limit passes when every decision agrees (1 = strict).
        precision: the name it is listed under in :data:`TOLERANCES` (reports and messages).
        factor: multiplies every derived float and box-corner limit (``--parity-tolerance 2``).
        overrides: output name or kind → its limit (max |Δ| for floats, minimum share for decision
            rows), ``agreement`` → every decision row's minimum share, ``box_px`` → the corner limit.
    """

    atol: float = 1e-4
    min_agreement: float = 1.0
    box_px: float = 0.5
    box_score: float = 0.3
    unit_roundoff: float = 0.0
    slack: float = 1.0
    precision: str = "fp32"
    factor: float = 1.0
    overrides: Mapping[str, float] = field(default_factory=dict)

    def float_limit(self, name: str, kind: str, scale: float, own_atol: float | None = None) -> tuple[float, bool]:
        """(limit, overridden) of a float output of ``kind`` whose reference reaches |value| ``scale``."""
        for key in (name, kind):
            if key in self.overrides:
                return float(self.overrides[key]), True
        derived = FLOAT_FACTORS.get(kind, FLOAT_FACTORS["float"]) * self.unit_roundoff * scale * self.factor
        return max(self.atol, derived, float(own_atol or 0.0)), False

    def corner_limit(self, name: str, scale: float) -> float:
        """Box corners: pixels, at the frame size ``scale``."""
        for key in ("box_px", name):
            if key in self.overrides and key != name:
                return float(self.overrides[key])
        return max(self.box_px, FLOAT_FACTORS["box"] * self.unit_roundoff * scale * self.factor)

    def agreement(self, name: str | None, kind: str | None) -> float:
        """Minimum share of a decision row (ranked outputs pass no name or kind: theirs set the value limit)."""
        for key in (name, kind, "agreement"):
            if key is not None and key in self.overrides:
                return float(self.overrides[key])
        return self.min_agreement


# by artefact precision (the module table): fp32 graphs must match to float noise and decide identically
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1.0, unit_roundoff=2.0**-24, slack=1.0, precision="fp32"),
    "fp16": Tolerance(1e-4, 0.98, unit_roundoff=2.0**-11, slack=2.0, precision="fp16"),
    "bf16": Tolerance(1e-4, 0.95, unit_roundoff=2.0**-8, slack=2.0, precision="bf16"),
    "int8": Tolerance(1e-4, 0.90, unit_roundoff=1.0 / 254, slack=2.0, precision="int8"),
}


def parse_tolerance(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``--parity-tolerance`` text → overrides: comma-separated ``KEY=VALUE`` entries and at most one
    bare number (a factor on every derived limit). KEY: an output name (``grade_probs=0.02``: its max
    |Δ|; ``grade=0.9``: its minimum agreement), a kind (``heatmap=0.2``, ``float=0.05``),
    ``agreement`` (every decision row), ``box_px`` (box corners, pixels) or ``factor``."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): float(v) for k, v in text.items()}
    out: dict[str, float] = {}
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("factor", key.strip())
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{TOLERANCE_FLAG} {text!r}: {value!r} is not a number (use NAME=LIMIT entries or one factor, "
                             "e.g. 'grade_probs=0.02,grade_heatmap=0.2' or '2')") from None
        if not key or not math.isfinite(number) or number < 0:
            raise ValueError(f"{TOLERANCE_FLAG} {text!r}: {item!r} needs a name and a finite limit ≥ 0")
        if key == "factor" and "factor" in out:
            raise ValueError(f"{TOLERANCE_FLAG} {text!r}: one factor at most")
        out[key] = number
    return out


def tolerance_for(precision: str, override: "Tolerance | str | Mapping[str, float] | None" = None) -> Tolerance:
    """The tolerance of ``precision`` (:data:`TOLERANCES`) with ``--parity-tolerance`` overrides applied
    (text or mapping, :func:`parse_tolerance`); a :class:`Tolerance` given as ``override`` is used as is."""
    if isinstance(override, Tolerance):
        return override
    if precision not in TOLERANCES:
        raise ValueError(f"no parity tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    base = TOLERANCES[precision]
    extra = parse_tolerance(override)
    if not extra:
        return base
    factor = extra.pop("factor", None)
    return replace(base, factor=base.factor * factor if factor is not None else base.factor, overrides={**base.overrides, **extra})


@dataclass(frozen=True)
class ParityReference:
    """What an artefact is compared against: the eager deployable module of the checkpoint
    (``deployable`` + ``loaded``), or, when the checkpoint is not at hand, another artefact
    (``path``: the fp32 ONNX graph an INT8 graph or an engine was built from)."""

    deployable: Any = None
    loaded: Any = None
    path: Path | None = None


class Verifier(Protocol):
    """Runs an artefact and its reference on the same inputs and compares every output
    (:func:`lineside.runtime.verify.verify_artefact` is the one the ``lineside export`` command
    passes). Builders in ``export`` take one as ``verify=`` (and ``tolerance=``, the
    ``--parity-tolerance`` overrides, resolved with :func:`tolerance_for` before the call): building
    needs no runtime, checking does, and ``runtime`` sits above ``export``. Raises ``RuntimeError``
    when the artefact cannot run here (e.g. an engine without its GPU)."""

    def __call__(self, artefact: Path, reference: ParityReference, inputs: Any, tolerance: "Tolerance | str",
                 device: str = "cpu", batch_size: int = 8) -> "ParityReport": ...


_SHARE_METRICS = ("agreement", "matched", "top-1")


@dataclass
class ParityRow:
    output: str
    kind: str
    metric: str
    value: float
    limit: float
    ok: bool
    detail: str = ""


@dataclass
class ParityReport:
    reference: str
    candidate: str
    n_images: int
    rows: list[ParityRow] = field(default_factory=list)
    precision: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        head = f"parity: {self.candidate} vs {self.reference} on {self.n_images} real images"
        if self.precision:
            head += f" ({self.precision} tolerances)"
        lines = [head, f"  {'output':<16} {'kind':<9} {'metric':<10} {'value':>10} {'limit':>10}  result"]
        for r in self.rows:
            share = r.metric in _SHARE_METRICS
            value = f"{100 * r.value:.2f}%" if share else f"{r.value:.2e}"
            limit = f"≥{100 * r.limit:.0f}%" if share else f"{r.limit:.2e}"
            lines.append(f"  {r.output:<16} {r.kind:<9} {r.metric:<10} {value:>10} {limit:>10}  {'ok' if r.ok else 'FAIL'}{' ' + r.detail if r.detail else ''}")
        lines.append(f"  → {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        """What failed (output, value, limit) and which flag accepts it or skips the check; '' when it passed."""
        bad = [r for r in self.rows if not r.ok]
        if not bad and self.rows:
            return ""
        parts, accept = [], []
        for r in bad:
            if r.metric in _SHARE_METRICS:
                parts.append(f"{r.output} {r.metric} {100 * r.value:.2f}% < {100 * r.limit:.0f}%")
                key = "agreement" if r.metric == "top-1" else r.output  # a ranked output's own key sets its value limit
                accept.append(f"{key}={math.floor(r.value * 100) / 100:g}")
            elif r.metric == "max|Δ|" and math.isfinite(r.value):
                parts.append(f"{r.output} max|Δ| {r.value:.2e} > limit {r.limit:.2e}")
                accept.append(f"{r.output}={_round_up(r.value * 1.25):g}")
            else:
                parts.append(f"{r.output}: {r.metric} {r.detail}".strip())
        text = "; ".join(parts) if parts else "no outputs compared"
        if accept and len(accept) == len(bad):
            text += f". To accept: {TOLERANCE_FLAG} {','.join(accept)} (see --help); to skip the check: {SKIP_FLAG}"
        else:
            text += f". No tolerance accepts this (re-export; {TOLERANCE_FLAG} adjusts limits of the rows that have one); to skip the check: {SKIP_FLAG}"
        return text

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "n_images": self.n_images, "ok": self.ok,
                "precision": self.precision, "rows": [asdict(r) for r in self.rows]}


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - 1
    return math.ceil(x / 10**e) * 10**e


def _scale(a: np.ndarray) -> float:
    """An output's scale: its largest finite |value| in the reference."""
    a = np.abs(a[np.isfinite(a)]) if a.size else a
    return float(a.max()) if a.size else 0.0


def _max_delta(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    finite = bool(np.isfinite(b).all())
    return (float(np.abs(a - b).max()) if a.size else 0.0), finite


def compare_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], specs: list[dict], tol: Tolerance | str) -> list[ParityRow]:
    """Rows comparing every output in ``specs`` (metadata ``outputs``), in their order: decisions
    (decoded, boxes, ranked candidates) and floats at the limits of ``tol`` (module docstring)."""
    tol = tolerance_for(tol) if isinstance(tol, str) else tol
    by_kind = {s.get("kind"): s["name"] for s in specs}
    scores, labels = by_kind.get("box_score"), by_kind.get("box_label")
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows: dict[str, ParityRow] = {}
    for spec in specs:
        name, kind = spec["name"], spec.get("kind", "float")
        if name not in cand or name not in ref:
            rows[name] = ParityRow(name, kind, "present", 0.0, 1.0, False, "missing from " + ("candidate" if name not in cand else "reference"))
        elif np.shape(ref[name]) != np.shape(cand[name]):
            rows[name] = ParityRow(name, kind, "shape", 0.0, 1.0, False, f"{np.shape(ref[name])} vs {np.shape(cand[name])}")
        else:
            arrays[name] = (np.asarray(ref[name]), np.asarray(cand[name]))
    # float limits first: decisions use them for near ties
    limits: dict[str, tuple[float, bool]] = {}
    for spec in specs:
        name, kind = spec["name"], spec.get("kind", "float")
        if name in arrays and kind not in ("decoded", "box", "box_label"):
            limits[name] = tol.float_limit(name, kind, _scale(arrays[name][0].astype(np.float64)), spec.get("atol"))
    boxes_ok = all(n in arrays for n in (by_kind.get("box"), scores, labels) if n)
    decisions: set[str] = set()
    floats: dict[str, tuple[float, float, bool, bool]] = {}
    for spec in specs:
        name, kind = spec["name"], spec.get("kind", "float")
        if name not in arrays:
            continue
        a, b = arrays[name]
        ranked_by = spec.get("ranked_by")
        if kind == "box" and boxes_ok and scores and labels:
            rows[name] = _box_row(name, a, b, *arrays[scores], *arrays[labels], tol)
        elif kind == "box_label" and boxes_ok and scores:
            rows[name] = _box_label_row(name, a, b, *arrays[scores], tol)
        elif kind in ("decoded", "box_label"):
            rows[name] = _decoded_row(name, kind, a, b, arrays, limits, tol)
        elif ranked_by and ranked_by in arrays and a.ndim >= 2:
            rows[name] = _ranked_row(name, kind, a, b, *arrays[ranked_by], limits[name][0], limits.get(ranked_by, (tol.atol, False))[0], tol)
        else:
            delta, finite = _max_delta(a.astype(np.float64), b.astype(np.float64))
            limit, overridden = limits[name]
            floats[name] = (delta, limit, finite, overridden)
            continue
        decisions.add(name)
    decided = all(rows[n].ok for n in decisions)
    for name, (delta, limit, finite, overridden) in floats.items():
        kind = next(s.get("kind", "float") for s in specs if s["name"] == name)
        ok, detail = finite and delta <= limit, "" if finite else "non-finite values"
        hard = limit * (1.0 if overridden else tol.slack)
        if finite and not ok and delta <= hard:
            if decided:
                ok, detail = True, f"above the {tol.precision} limit, within {tol.slack:g}× with every decision row passing"
            else:
                detail = f"above the {tol.precision} limit (within {tol.slack:g}× passes only while every decision row passes)"
        rows[name] = ParityRow(name, kind, "max|Δ|", delta, limit, ok, detail)
    return [rows[s["name"]] for s in specs]


def _argmax_source(d_ref: np.ndarray, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
    """The float output whose argmax over its last axis is the decoded output ``d_ref`` on the reference."""
    for name, (f_ref, _) in arrays.items():
        if f_ref.dtype.kind == "f" and f_ref.ndim == d_ref.ndim + 1 and f_ref.shape[:-1] == d_ref.shape and f_ref.shape[-1] > 1:
            if np.array_equal(f_ref.argmax(-1), d_ref):
                return name
    return None


def _decoded_row(name: str, kind: str, a, b, arrays, limits, tol: Tolerance) -> ParityRow:
    """Share of items whose decoded value agrees; differing items whose float source is a near tie
    on the reference (top two within twice its limit) count as agreeing."""
    n = len(a)
    differ = ~(a == b).reshape(n, -1).all(1) if n else np.zeros(0, bool)
    agree = float(1 - differ.mean()) if n else 1.0
    n_bad = int(differ.sum())
    ties = 0
    src = _argmax_source(a, arrays) if n_bad and a.ndim >= 1 else None
    margin = 0.0
    if src is not None and src in limits:
        f = np.sort(arrays[src][0].astype(np.float64), -1)
        gap = (f[..., -1] - f[..., -2]).reshape(n, -1).min(1)
        margin = 2 * limits[src][0]
        ties = int((differ & (gap <= margin)).sum())
    need = tol.agreement(name, kind)
    ok = agree + ties / max(n, 1) >= need - 1e-12
    detail = ""
    if n_bad:
        detail = f"({n_bad} of {n} differ" + (f"; {ties} near ties of {src} within {margin:.2g}" if ties else "") + ")"
    return ParityRow(name, kind, "agreement", agree, need, ok, detail)


def _ranked_row(name: str, kind: str, a, b, sa, sb, limit: float, score_limit: float, tol: Tolerance) -> ParityRow:
    """Ranked candidates (best first along axis 1): the frames whose top candidate agrees within
    ``limit`` (every value), or matches a reference candidate scoring within twice ``score_limit``
    of the reference's best (a near tie). Frames where neither side has a candidate (score ≤ 0) are skipped."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    n = len(a)
    frames = matched = ties = 0
    worst = 0.0
    for i in range(n):
        if sa[i, 0] <= 0 and sb[i, 0] <= 0:
            continue
        frames += 1
        d = np.abs(a[i] - b[i, 0]).reshape(a.shape[1], -1).max(1)  # candidate's top vs every reference rank
        if np.isfinite(d[0]) and d[0] <= limit:
            matched += 1
            worst = max(worst, float(d[0]))
            continue
        near = (sa[i] >= sa[i, 0] - 2 * score_limit) & (d <= limit)
        if near.any():
            matched, ties = matched + 1, ties + 1
    value = matched / frames if frames else 1.0
    need = tol.agreement(None, None)  # NAME=… of a ranked output sets its value limit (its units), not a share
    finite = bool(np.isfinite(b).all())
    detail = f"top candidate of {frames} frames within {limit:.2g} (worst {worst:.2g})" + (f"; {ties} near ties" if ties else "")
    if frames - matched:
        detail += f"; {frames - matched} moved"
    return ParityRow(name, kind, "top-1", value, need, finite and value >= need, detail if finite else "non-finite values")


def _box_matches(boxes_a, scores_a, labels_a, boxes_b, labels_b, box_score: float, px: float) -> tuple[int, int, float]:
    """Boxes of one frame on side a scoring ≥ ``box_score`` that have an unused same-label box on
    side b (any score) within ``px`` at every corner: (matched, total, largest corner |Δ| matched)."""
    used = np.zeros(len(boxes_b), dtype=bool)
    matched, worst = 0, 0.0
    wanted = np.flatnonzero(scores_a >= box_score)
    for j in wanted:
        delta = np.abs(boxes_b - boxes_a[j]).max(-1)
        ok = (labels_b == labels_a[j]) & (delta <= px) & ~used
        if ok.any():
            best = int(np.flatnonzero(ok)[np.argmin(delta[ok])])
            used[best] = True
            matched += 1
            worst = max(worst, float(delta[best]))
    return matched, len(wanted), worst


def _box_row(name: str, a, b, sa, sb, la, lb, tol: Tolerance) -> ParityRow:
    """Row ``boxes``: the share of boxes above the score threshold (both sides) matched on the other side."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    px = tol.corner_limit(name, _scale(a))
    matched = total = 0
    worst = 0.0
    for i in range(len(a)):
        for x, s, lx, y, ly in ((a[i], sa[i], la[i], b[i], lb[i]), (b[i], sb[i], lb[i], a[i], la[i])):
            m, t, w = _box_matches(x, s, lx, y, ly, tol.box_score, px)
            matched, total, worst = matched + m, total + t, max(worst, w)
    value = matched / total if total else 1.0
    finite = bool(np.isfinite(b).all())
    need = tol.agreement(name, "box")
    detail = f"{total} boxes ≥ {tol.box_score:g} (both sides), corners within {worst:.2g} px (limit {px:.2g})"
    if total - matched:
        detail += f"; {total - matched} unmatched"
    return ParityRow(name, "box", "matched", value, need, finite and value >= need, detail if finite else "non-finite values")


def _box_label_row(name: str, la, lb, sa, sb, tol: Tolerance) -> ParityRow:
    """Row ``box_labels``: the share of frames whose sorted labels above the score threshold agree."""
    same = [sorted(la[i][sa[i] >= tol.box_score].tolist()) == sorted(lb[i][sb[i] >= tol.box_score].tolist()) for i in range(len(la))]
    agree = float(np.mean(same)) if same else 1.0
    n_bad = len(same) - int(sum(same))
    need = tol.agreement(name, "box_label")
    return ParityRow(name, "box_label", "agreement", agree, need, agree >= need,
                     f"({n_bad} of {len(same)} frames differ above {tol.box_score:g})" if n_bad else "")


def _check_overrides(tol: Tolerance, specs: list[dict]) -> None:
    known = {s["name"] for s in specs} | {s.get("kind", "float") for s in specs} | set(_SPECIAL_KEYS)
    unknown = sorted(set(tol.overrides) - known)
    if unknown:
        raise ValueError(f"{TOLERANCE_FLAG}: no output or kind named {', '.join(unknown)}; outputs: "
                         + ", ".join(s["name"] for s in specs) + "; kinds: " + ", ".join(sorted({s.get('kind', 'float') for s in specs}))
                         + "; also: " + ", ".join(_SPECIAL_KEYS))


def check_parity(reference, candidate, images: np.ndarray | dict[str, np.ndarray], tolerance: Tolerance | str = "fp32",
                 batch_size: int = 8) -> ParityReport:
    """Run ``reference`` and ``candidate`` backends on the same uint8 ``images`` and compare every output.

    Args:
        reference: a :class:`runtime.backend.Backend` (usually eager torch on the checkpoint).
        candidate: the exported artefact's backend.
        images: (N, C, H, W) uint8 at the candidate's input size, or named inputs (``points``,
            ``point_mask`` … for a point model), each with the batch first.
        tolerance: a :class:`Tolerance` (e.g. from :func:`tolerance_for` with overrides) or a
            precision name in :data:`TOLERANCES`.
        batch_size: images per call (odd tails exercise the dynamic batch).
    """
    tol = tolerance_for(tolerance) if isinstance(tolerance, str) else tolerance
    specs = candidate.output_specs or reference.output_specs
    _check_overrides(tol, specs)
    n = len(next(iter(images.values()))) if isinstance(images, dict) else len(images)
    refs, cands = [], []
    for i in range(0, n, batch_size):
        x = {k: v[i : i + batch_size] for k, v in images.items()} if isinstance(images, dict) else images[i : i + batch_size]
        refs.append(reference(x))
        cands.append(candidate(x))
    ref = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    cand = {k: np.concatenate([c[k] for c in cands]) for k in cands[0]}
    report = ParityReport(reference.describe(), candidate.describe(), n, precision=tol.precision)
    report.rows = compare_outputs(ref, cand, specs, tol)
    return report
