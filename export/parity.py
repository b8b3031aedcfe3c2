"""Parity: does an exported artefact give what the trained model gives, on real images?

Every output listed in the metadata is compared: ``float`` outputs by max |Δ| against a
tolerance, ``decoded`` outputs (grades …) by the share of items that agree.
A new head adds rows to the metadata, never code here.

Boxes (kinds ``box``, ``box_score``, ``box_label``) are compared as detections, not as arrays:
top-K order among near-tied scores is not a decision, and pixel coordinates carry float noise
in proportion to their size. Every box scoring at least ``box_score`` (either side) must have a
box of the same label within ``box_px`` pixels (every corner) on the other side (row ``boxes``,
metric ``matched``); the sorted labels above ``box_score`` must agree per frame (row
``box_labels``); ``box_scores`` are floats (sorted descending, so swaps do not matter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ParityRow", "ParityReport", "Tolerance", "TOLERANCES", "check_parity", "compare_outputs"]


@dataclass(frozen=True)
class Tolerance:
    """Pass limits: ``atol`` on float outputs, ``min_agreement`` on decoded outputs (and on the
    share of matched boxes), ``box_px`` on box corners, ``box_score``: boxes compared from this score,
    ``heatmap_atol`` on outputs of kind ``heatmap`` (None = ``atol``): a map normalised to its own
    peak (``grade_heatmap``) moves by more than the logits it comes from under reduced precision."""

    atol: float = 1e-4
    min_agreement: float = 1.0
    box_px: float = 0.5
    box_score: float = 0.3
    heatmap_atol: float | None = None


# by artefact precision: fp32 graphs must match to float noise and decide identically
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1.0),
    # heatmaps normalised to their peak: the quickstart-text model's grade_heatmap moved by 0.048 (fp16)
    # and 0.26 (INT8 Q/DQ) at most on 32 ELPV cells, while its grade_probs moved by 0.012 and 0.086
    "fp16": Tolerance(1e-2, 0.98, heatmap_atol=0.1),
    "bf16": Tolerance(3e-2, 0.95, heatmap_atol=0.25),
    "int8": Tolerance(0.1, 0.90, heatmap_atol=0.4),
}


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

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        head = f"parity: {self.candidate} vs {self.reference} on {self.n_images} real images"
        lines = [head, f"  {'output':<16} {'kind':<8} {'metric':<10} {'value':>10} {'limit':>10}  result"]
        for r in self.rows:
            value = f"{r.value:.2e}" if r.metric == "max|Δ|" else f"{100 * r.value:.2f}%"
            limit = f"{r.limit:.0e}" if r.metric == "max|Δ|" else f"≥{100 * r.limit:.0f}%"
            lines.append(f"  {r.output:<16} {r.kind:<8} {r.metric:<10} {value:>10} {limit:>10}  {'ok' if r.ok else 'FAIL'}{' ' + r.detail if r.detail else ''}")
        lines.append(f"  → {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "n_images": self.n_images, "ok": self.ok,
                "rows": [asdict(r) for r in self.rows]}


def compare_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], specs: list[dict], tol: Tolerance) -> list[ParityRow]:
    """Rows comparing every output in ``specs`` (metadata ``outputs``)."""
    rows = []
    by_kind = {s.get("kind"): s["name"] for s in specs}
    for spec in specs:
        name, kind = spec["name"], spec.get("kind", "float")
        if name not in cand or name not in ref:
            rows.append(ParityRow(name, kind, "present", 0.0, 1.0, False, "missing from " + ("candidate" if name not in cand else "reference")))
            continue
        a, b = np.asarray(ref[name]), np.asarray(cand[name])
        if a.shape != b.shape:
            rows.append(ParityRow(name, kind, "shape", 0.0, 1.0, False, f"{a.shape} vs {b.shape}"))
            continue
        scores, labels = by_kind.get("box_score"), by_kind.get("box_label")
        boxes_ok = kind in ("box", "box_label") and all(n in ref and n in cand and np.shape(ref[n]) == np.shape(cand[n])
                                                        for n in (by_kind.get("box"), scores, labels) if n)
        if boxes_ok and scores and labels and kind == "box":
            rows.append(_box_row(name, a, b, np.asarray(ref[scores]), np.asarray(cand[scores]), np.asarray(ref[labels]),
                                 np.asarray(cand[labels]), tol))
        elif boxes_ok and scores and kind == "box_label":
            rows.append(_box_label_row(name, a, b, np.asarray(ref[scores]), np.asarray(cand[scores]), tol))
        elif kind in ("decoded", "box_label"):
            agree = float((a == b).reshape(len(a), -1).all(1).mean()) if len(a) else 1.0
            n_bad = int(round((1 - agree) * len(a)))
            rows.append(ParityRow(name, kind, "agreement", agree, tol.min_agreement, agree >= tol.min_agreement,
                                  f"({n_bad} of {len(a)} differ)" if n_bad else ""))
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            finite = bool(np.isfinite(b64).all())
            delta = float(np.abs(a64 - b64).max()) if a.size else 0.0
            base = tol.heatmap_atol if kind == "heatmap" and tol.heatmap_atol is not None else tol.atol
            limit = max(base, float(spec.get("atol") or 0.0))  # an output's own tolerance in its units (grasp positions: 1 mm)
            rows.append(ParityRow(name, kind, "max|Δ|", delta, limit, finite and delta <= limit, "" if finite else "non-finite values"))
    return rows


def _box_matches(boxes_a, scores_a, labels_a, boxes_b, labels_b, tol: Tolerance) -> tuple[int, int, float]:
    """Boxes of one frame on side a scoring ≥ ``box_score`` that have an unused same-label box on
    side b (any score) within ``box_px`` at every corner: (matched, total, largest corner |Δ| matched)."""
    used = np.zeros(len(boxes_b), dtype=bool)
    matched, worst = 0, 0.0
    wanted = np.flatnonzero(scores_a >= tol.box_score)
    for j in wanted:
        delta = np.abs(boxes_b - boxes_a[j]).max(-1)
        ok = (labels_b == labels_a[j]) & (delta <= tol.box_px) & ~used
        if ok.any():
            best = int(np.flatnonzero(ok)[np.argmin(delta[ok])])
            used[best] = True
            matched += 1
            worst = max(worst, float(delta[best]))
    return matched, len(wanted), worst


def _box_row(name: str, a, b, sa, sb, la, lb, tol: Tolerance) -> ParityRow:
    """Row ``boxes``: the share of boxes above the score threshold (both sides) matched on the other side."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    matched = total = 0
    worst = 0.0
    for i in range(len(a)):
        for x, s, lx, y, ly in ((a[i], sa[i], la[i], b[i], lb[i]), (b[i], sb[i], lb[i], a[i], la[i])):
            m, t, w = _box_matches(x, s, lx, y, ly, tol)
            matched, total, worst = matched + m, total + t, max(worst, w)
    value = matched / total if total else 1.0
    finite = bool(np.isfinite(b).all())
    detail = f"{total} boxes ≥ {tol.box_score:g} (both sides), corners within {worst:.2g} px (limit {tol.box_px:g})"
    if total - matched:
        detail += f"; {total - matched} unmatched"
    return ParityRow(name, "box", "matched", value, tol.min_agreement, finite and value >= tol.min_agreement,
                     detail if finite else "non-finite values")


def _box_label_row(name: str, la, lb, sa, sb, tol: Tolerance) -> ParityRow:
    """Row ``box_labels``: the share of frames whose sorted labels above the score threshold agree."""
    same = [sorted(la[i][sa[i] >= tol.box_score].tolist()) == sorted(lb[i][sb[i] >= tol.box_score].tolist()) for i in range(len(la))]
    agree = float(np.mean(same)) if same else 1.0
    n_bad = len(same) - int(sum(same))
    return ParityRow(name, "box_label", "agreement", agree, tol.min_agreement, agree >= tol.min_agreement,
                     f"({n_bad} of {len(same)} frames differ above {tol.box_score:g})" if n_bad else "")


def check_parity(reference, candidate, images: np.ndarray | dict[str, np.ndarray], tolerance: Tolerance | str = "fp32",
                 batch_size: int = 8) -> ParityReport:
    """Run ``reference`` and ``candidate`` backends on the same uint8 ``images`` and compare every output.

    Args:
        reference: a :class:`export.backends.Backend` (usually eager torch on the checkpoint).
        candidate: the exported artefact's backend.
        images: (N, C, H, W) uint8 at the candidate's input size, or named inputs (``points``,
            ``point_mask`` … for a point model), each with the batch first.
        tolerance: a :class:`Tolerance` or a precision name in :data:`TOLERANCES`.
        batch_size: images per call (odd tails exercise the dynamic batch).
    """
    tol = TOLERANCES[tolerance] if isinstance(tolerance, str) else tolerance
    n = len(next(iter(images.values()))) if isinstance(images, dict) else len(images)
    refs, cands = [], []
    for i in range(0, n, batch_size):
        x = {k: v[i : i + batch_size] for k, v in images.items()} if isinstance(images, dict) else images[i : i + batch_size]
        refs.append(reference(x))
        cands.append(candidate(x))
    ref = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    cand = {k: np.concatenate([c[k] for c in cands]) for k in cands[0]}
    report = ParityReport(reference.describe(), candidate.describe(), n)
    report.rows = compare_outputs(ref, cand, candidate.output_specs or reference.output_specs, tol)
    return report
