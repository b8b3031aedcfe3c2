"""Does the good-only PatchMemory add to the trained grader? Measured out-of-fold on ELPV.

    lineside patch-memory crossval --folds 5 --out runs/patch_memory/elpv_cv.npz
    python bench/anomaly_fusion.py --scores runs/patch_memory/elpv_cv.npz --run runs/el_grading_cv

Both inputs hold predictions for the same 5 module-block folds (each cell scored by models and
memories that never saw its module). Printed:

1. AUROC ok-vs-defective of the grader, the memory and their rank mean, out-of-fold and per fold
   (test blocks for the record only).
2. The 4-grade decision with the memory as evidence: ``log p(grade) + w * z * [0, 1/3, 2/3, 1]``
   (z = log anomaly score standardised on the ok cells of the training folds, per cell type),
   with ``w`` and the per-grade offsets (``mean`` objective) chosen on the other folds only
   (nested), against the grader with nested offsets alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lineside.fusion.crossval import _load_run  # noqa: E402
from lineside.fusion.ensemble import _score, fit_grade_bias, grade_metrics  # noqa: E402
from lineside.vision.elpv import elpv_records  # noqa: E402
from lineside.vision.patch_memory_scoring import anomaly_auroc as _auroc, empirical_rank as _rank  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
SHAPE = np.array([0.0, 1 / 3, 2 / 3, 1.0])  # evidence of a defect pushes towards the severe grades


def _align(run: list[dict], paths: np.ndarray, key: str) -> np.ndarray:
    """Grader probabilities of ``key`` ('oof': the cell's fold model; 'test': mean of the fold models) in ``paths`` order."""
    found: dict[str, list[np.ndarray]] = {}
    for fold in run:
        for p, pr in zip(fold[f"{key}_paths"], fold[f"{key}_probs"]):
            found.setdefault(str(p), []).append(pr)
    missing = [p for p in paths if str(p) not in found]
    if missing:
        raise SystemExit(f"the run has no {key} prediction for {len(missing)} cells (e.g. {missing[0]}): same data, folds and seed?")
    return np.array([np.mean(found[str(p)], 0) for p in paths])


def _z(values: np.ndarray, ref: np.ndarray, types: np.ndarray, ref_types: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values)
    for t in np.unique(types):
        r = ref[ref_types == t]
        out[types == t] = (values[types == t] - r.mean()) / r.std()
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def nested_fusion(probs, log_score, labels, fold, types, weights=WEIGHTS, objective="mean") -> tuple[np.ndarray, list[float]]:
    """Out-of-fold probabilities after fusion, ``w`` and offsets chosen on the other folds; and the chosen ``w`` per fold."""
    out, chosen = np.zeros_like(probs), []
    for k in np.unique(fold):
        tr, va = fold != k, fold == k
        ok = tr & (labels == 0)
        z_tr = _z(log_score[tr], log_score[ok], types[tr], types[ok])
        z_va = _z(log_score[va], log_score[ok], types[va], types[ok])
        best = None
        for w in weights:
            logits = np.log(np.clip(probs[tr], 1e-12, None)) + w * z_tr[:, None] * SHAPE
            bias = fit_grade_bias(_softmax(logits), labels[tr], objective)
            s = _score(logits, labels[tr], bias, objective)
            if best is None or s > best[0]:
                best = (s, w, bias)
        out[va] = _softmax(np.log(np.clip(probs[va], 1e-12, None)) + best[1] * z_va[:, None] * SHAPE + best[2])
        chosen.append(best[1])
    return out, chosen


def _row(name: str, m: dict) -> str:
    rec = " / ".join(f"{100 * r:.1f}" for r in m["recall"])
    return f"| {name} | {100 * m['acc']:.1f}% | {m['macro_f1']:.3f} | {m['auroc_defective']:.3f} | {rec} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", required=True, help="npz from `lineside patch-memory crossval --out`")
    ap.add_argument("--run", required=True, help="a finished crossval.py run folder on the same folds")
    ap.add_argument("--folds", type=int, default=5)
    a = ap.parse_args(argv)
    r = np.load(a.scores, allow_pickle=False)
    run = _load_run(Path(a.run), a.folds)
    text = {rec.path: rec.text for rec in elpv_records()}
    y, f, s = r["oof_labels"], r["oof_fold"], r["oof_scores"]
    types = np.array([text.get(str(p), "") for p in r["oof_paths"]])
    p_oof, p_test = _align(run, r["oof_paths"], "oof"), _align(run, r["test_paths"], "test")
    yt, st = r["test_labels"], r["test_scores"]

    print("\nAUROC ok-vs-defective, out-of-fold on the block folds (test blocks for the record only)\n")
    print("| scorer | OOF | " + " | ".join(f"fold {k}" for k in range(a.folds)) + " | test |")
    print("|---|---|" + "---|" * a.folds + "---|")
    for name, oof, te in (
        ("grader", 1 - p_oof[:, 0], 1 - p_test[:, 0]),
        ("patch memory", s, st),
        ("rank mean", 0.5 * (_rank(1 - p_oof[:, 0]) + _rank(s)), 0.5 * (_rank(1 - p_test[:, 0]) + _rank(st))),
    ):
        per = " | ".join(f"{_auroc(oof[f == k], y[f == k] > 0):.3f}" for k in range(a.folds))
        print(f"| {name} | {_auroc(oof, y > 0):.3f} | {per} | {_auroc(te, yt > 0):.3f} |")

    base, _ = nested_fusion(p_oof, np.log(s), y, f, types, weights=(0.0,))
    fused, chosen = nested_fusion(p_oof, np.log(s), y, f, types)
    print("\n4-grade decisions, out-of-fold, offsets (and w) chosen on the other folds\n")
    print("| decision | acc | macro-F1 | AUROC | recall ok / mild / moderate / severe % |\n|---|---|---|---|---|")
    print(_row("grader + nested offsets", grade_metrics(base, y)))
    print(_row(f"grader + memory evidence (w per fold: {', '.join(f'{w:g}' for w in chosen)})", grade_metrics(fused, y)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
