"""``lineside patch-memory``: good-only anomaly scores and heatmaps (:class:`lineside.vision.patch_memory.PatchMemory`).

    lineside patch-memory fit --input good_cells/ --out memory.pt
    lineside patch-memory score --memory memory.pt --input labelled.csv --good-label ok --output scores.csv
    lineside patch-memory crossval --folds 5 --out runs/patch_memory/elpv_cv.npz   # built-in ELPV, block folds

``crossval`` is the ELPV experiment of the README: out-of-fold AUROC on the module-block folds
that ``lineside crossval`` trains the grader on (``bench/anomaly_fusion.py`` compares the two).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import numpy as np
import torch

from lineside.cli.common import add_batch_size_arg, add_out_arg
from lineside.vision.patch_memory import PatchMemory, PatchMemoryError
from lineside.vision.patch_memory_scoring import anomaly_auroc, fit_memory, image_batches, score_to_csv

__all__ = ["main", "build_parser", "elpv_crossval"]


def _read_inputs(spec: str, good_label: str | None, need_good_label: bool = False) -> tuple[list[str], np.ndarray | None]:
    """Paths of --input and, for a labelled manifest with --good-label, 1 = not good / 0 = good / -1 = unlabelled.

    ``need_good_label``: a manifest with labels but no --good-label is refused (fitting on it would
    put defective parts into the memory of good ones).
    """
    from lineside.vision.records import records_from_manifest

    if spec.lower().endswith(".csv"):
        records, names = records_from_manifest(spec)
        paths = [r.path for r in records]
        if good_label is None:
            if need_good_label and any(r.label >= 0 for r in records):
                raise SystemExit(f"{spec}: the manifest has labels {names}; pass --good-label NAME so only good images enter the memory")
            return paths, None
        if good_label not in names:
            raise SystemExit(f"{spec}: --good-label {good_label!r} is not one of the manifest's labels {names}")
        good = names.index(good_label)
        return paths, np.array([-1 if r.label < 0 else int(r.label != good) for r in records])
    from lineside.vision.io import collect_inputs

    return collect_inputs(spec), None


def _fit_cmd(a: argparse.Namespace) -> int:
    paths, bad = _read_inputs(a.input, a.good_label, need_good_label=True)
    if bad is not None:
        paths = [p for p, b in zip(paths, bad) if b == 0]
    try:
        r = fit_memory(paths, a.channels, a.calib_fraction, a.quantile, a.batch_size, a.num_workers,
                       image_size=a.image_size, stride=a.stride, max_patches=a.max_patches, seed=a.seed)
    except PatchMemoryError as exc:
        raise PatchMemoryError(f"{a.input}: {exc}") from None
    if r.n_calibration:
        print(f"threshold {r.threshold:.4f}: the {a.quantile:.0%} quantile of {r.n_calibration} held-out good images")
    out = r.model.save(a.out)
    print(f"memory of {len(r.model.memory)} patches from {r.n_memory} good images ({len(r.skipped)} unreadable, skipped) → {out}")
    return 0


def _score_cmd(a: argparse.Namespace) -> int:
    model = PatchMemory.load(a.memory)
    paths, bad = _read_inputs(a.input, a.good_label)
    scores = score_to_csv(model, paths, a.out, a.overlays, a.batch_size, a.num_workers)
    print(f"wrote {len(paths)} rows ({int(np.isnan(scores).sum())} with errors) to {a.out}")
    if bad is not None:
        keep = (bad >= 0) & ~np.isnan(scores)
        print(f"AUROC good-vs-not-good {anomaly_auroc(scores[keep], bad[keep] == 1):.3f} on {int(keep.sum())} labelled images")
    return 0


def elpv_crossval(
    folds: int = 5, per_text: bool = True, block_size: int = 60, seed: int = 0, batch_size: int = 32, progress: bool = True, **memory_kwargs
) -> dict:
    """Anomaly scores of ELPV on the block folds and test split that ``lineside crossval`` uses.

    Out-of-fold: for fold k the memory holds the ok cells of the other folds (one memory per
    cell type when ``per_text``) and scores every cell of fold k. Test: the memory holds all
    ok cells of train + val and scores the test blocks. Patch features are computed once.
    Returns arrays ``oof_paths, oof_labels, oof_fold, oof_scores, test_paths, test_labels, test_scores``.
    """
    from tqdm import tqdm

    from lineside.vision.elpv import elpv_block_folds

    records, order, group = elpv_block_folds(folds, block_size, seed)
    model = PatchMemory(**memory_kwargs).eval()
    paths = [records[i].path for i in order]
    feats = []
    with torch.inference_mode():
        for images, errors, names in tqdm(
            image_batches(paths, 1, model.image_size, batch_size), total=math.ceil(len(paths) / batch_size), desc="patch features", disable=not progress
        ):
            if any(errors):
                raise PatchMemoryError("; ".join(e for e in errors if e))
            feats.append(model.embed(images).half())
    feats_t = torch.cat(feats)
    y = np.array([records[i].label for i in order])
    text = np.array([records[i].text if per_text else "" for i in order])
    scores = np.zeros(len(order), dtype=np.float32)
    with torch.inference_mode():
        for k in [*range(folds), -1]:
            for t in np.unique(text):
                train = (group != k) & (group >= 0) if k >= 0 else group >= 0
                good = np.flatnonzero(train & (y == 0) & (text == t))
                query = np.flatnonzero((group == k) & (text == t))
                if not len(query):
                    continue
                model.fit_features(feats_t[good])
                for s in range(0, len(query), batch_size):
                    scores[query[s : s + batch_size]] = model.score_features(feats_t[query[s : s + batch_size]]).score.numpy()
            if progress:
                v = group == k
                print(f"{'test' if k < 0 else f'fold {k}'}: {int(v.sum())} cells, AUROC ok-vs-defective {anomaly_auroc(scores[v], y[v] > 0):.3f}",
                      file=sys.stderr)
    n = int((group >= 0).sum())
    names = np.array(paths)
    return {
        "oof_paths": names[:n], "oof_labels": y[:n], "oof_fold": group[:n], "oof_scores": scores[:n],
        "test_paths": names[n:], "test_labels": y[n:], "test_scores": scores[n:],
    }  # fmt: skip


def _crossval_cmd(a: argparse.Namespace) -> int:
    r = elpv_crossval(a.folds, not a.pooled_types, seed=a.seed, batch_size=a.batch_size, image_size=a.image_size, stride=a.stride,
                      max_patches=a.max_patches)
    y, s, f = r["oof_labels"] > 0, r["oof_scores"], r["oof_fold"]
    per = " | ".join(f"{anomaly_auroc(s[f == k], y[f == k]):.3f}" for k in range(a.folds))
    print(f"\nAUROC ok-vs-defective, ELPV block folds (seed {a.seed}); the test blocks for the record, not for choosing\n")
    print(f"| OOF (n={len(y)}) | " + " | ".join(f"fold {k}" for k in range(a.folds)) + f" | test (n={len(r['test_labels'])}) |")
    print("|---|" + "---|" * a.folds + "---|")
    print(f"| {anomaly_auroc(s, y):.3f} | {per} | {anomaly_auroc(r['test_scores'], r['test_labels'] > 0):.3f} |")
    if a.out:
        np.savez(a.out, **r)
        print(f"\nscores saved to {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside patch-memory", description="PatchMemory: anomaly scores and heatmaps learned from good parts only.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, fit: bool = False) -> None:
        add_batch_size_arg(p)
        p.add_argument("--num-workers", type=int, default=min(2, os.cpu_count() or 1))
        if fit:
            p.add_argument("--image-size", type=int, default=300)
            p.add_argument("--stride", type=int, default=16)
            p.add_argument("--max-patches", type=int, default=40000)
            p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("fit", help="build a memory from good images (folder, glob or CSV manifest)")
    p.add_argument("--input", required=True)
    p.add_argument("--good-label", default=None, help="with a labelled CSV: the class name of good images (others are left out)")
    add_out_arg(p, help="the memory file to write (.pt)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--calib-fraction", type=float, default=0.1, help="good images kept out of the memory to set the threshold")
    p.add_argument("--quantile", type=float, default=0.99)
    common(p, fit=True)
    p.set_defaults(fn=_fit_cmd)

    p = sub.add_parser("score", help="anomaly score per image → CSV (AUROC too, for a labelled CSV with --good-label)")
    p.add_argument("--memory", required=True, help="memory file from `lineside patch-memory fit`")
    p.add_argument("--input", required=True)
    add_out_arg(p, help="results .csv")
    p.add_argument("--good-label", default=None)
    p.add_argument("--overlays", default=None, help="folder for PNGs of each image with its heatmap in red (full red = threshold)")
    common(p)
    p.set_defaults(fn=_score_cmd)

    p = sub.add_parser("crossval", help="out-of-fold AUROC on the built-in ELPV block folds")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--pooled-types", action="store_true", help="one memory for mono and poly cells instead of one per type")
    add_out_arg(p, required=False, default=None, help="save all scores to this .npz (bench/anomaly_fusion.py compares them with a grader)")
    common(p, fit=True)
    p.set_defaults(fn=_crossval_cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    from lineside.vision.io import InputError
    from lineside.vision.records import DatasetFormatError

    try:
        return a.fn(a)
    except (PatchMemoryError, InputError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
