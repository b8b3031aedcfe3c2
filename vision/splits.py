"""Seeded train/val/test splits: stratified by label, or by contiguous index blocks."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

__all__ = ["stratified_split", "block_split", "fold_split"]


def _sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    return int(round(n * val_fraction)), int(round(n * test_fraction))


def stratified_split(labels: Sequence[int], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[int]]:
    """Split indices so each label keeps its share in train/val/test (unlabelled = -1 is its own stratum)."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[int(y)].append(i)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for y in sorted(by_label):
        idx = rng.permutation(by_label[y]).tolist()
        n_val, n_test = _sizes(len(idx), val_fraction, test_fraction)
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test : n_test + n_val]
        out["train"] += idx[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def block_split(
    labels: Sequence[int], block_size: int = 60, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[int]]:
    """Split contiguous index blocks, never single items, into train/val/test.

    Datasets cut from larger objects (cells from solar modules, patches from one radiograph)
    store the pieces of one object next to each other; a random split would put sibling
    pieces on both sides and leak the object's conditions into the test set. Blocks are ranked by
    their mean label and dealt out group by group (seeded), so each split sees a similar
    label mix while no block is shared.
    """
    labels = np.asarray(labels)
    n = len(labels)
    blocks = [np.arange(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    n_val, n_test = _sizes(len(blocks), val_fraction, test_fraction)
    if n_test == 0 or (val_fraction > 0 and n_val == 0):
        raise ValueError(f"{len(blocks)} blocks of {block_size} are too few for val={val_fraction}, test={test_fraction}")
    rng = np.random.default_rng(seed)
    score = np.array([labels[b].mean() for b in blocks]) + rng.uniform(0, 1e-6, len(blocks))
    order = np.argsort(score)
    # one test block from each of n_test groups of similar blocks, then likewise for val
    test = [int(rng.choice(g)) for g in np.array_split(order, n_test)]
    rest = np.array([int(b) for b in order if int(b) not in test])
    val = [int(rng.choice(g)) for g in np.array_split(rest, n_val)] if n_val else []
    train = [b for b in range(len(blocks)) if b not in test and b not in val]
    take = lambda ids: sorted(int(i) for b in ids for i in blocks[b])  # noqa: E731
    return {"train": take(train), "val": take(val), "test": take(test)}


def fold_split(
    labels: Sequence[int], num_folds: int, fold: int, block_size: int | None = None, seed: int = 0
) -> dict[str, list[int]]:
    """Cross-validation fold ``fold`` of ``num_folds``: ``{"train": [...], "val": [...]}`` indices.

    With ``block_size`` whole contiguous blocks go to one fold (as in :func:`block_split`: blocks
    ranked by mean label, each run of ``num_folds`` similar blocks dealt one per fold, seeded);
    without, items are dealt per label (stratified). Every index is in exactly one fold's val.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if block_size:
        units = [np.arange(s, min(s + block_size, n)) for s in range(0, n, block_size)]
        score = np.array([labels[u].mean() for u in units]) + rng.uniform(0, 1e-6, len(units))
        order = np.argsort(score)
    else:
        units = [np.array([i]) for i in range(n)]
        order = np.lexsort((rng.uniform(size=n), labels))  # by label, shuffled within a label
    if len(units) < num_folds:
        raise ValueError(f"{len(units)} {'blocks' if block_size else 'items'} are too few for {num_folds} folds")
    assign = np.empty(len(units), dtype=int)
    for start in range(0, len(units), num_folds):
        group = order[start : start + num_folds]
        assign[group] = rng.permutation(num_folds)[: len(group)]
    val = sorted(int(i) for u in np.flatnonzero(assign == fold) for i in units[u])
    vset = set(val)
    return {"train": [i for i in range(n) if i not in vset], "val": val}
