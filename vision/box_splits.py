"""Seeded train/val/test splits of :class:`DetectionRecord` lists.

- :func:`stratified_record_split`: image by image, keeping each stratum's share (NEU-DET by
  file-prefix class; DeepPCB by board group, like its official random split);
- :func:`grouped_record_split`: whole physical groups (magnetic tile ``tile_group``: one tile
  under ~6 lightings), stratified by class, so no group straddles two splits.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from lineside.vision.box_records import DetectionRecord
from lineside.vision.splits import stratified_split

__all__ = ["grouped_record_split", "stratified_record_split"]


def _check(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")


def stratified_record_split(
    records: Sequence[DetectionRecord],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    key: Callable[[DetectionRecord], str] = lambda r: r.image_class,
) -> dict[str, list[DetectionRecord]]:
    """Split records so each ``key(record)`` value keeps its share in train/val/test (seeded)."""
    _check(val_fraction, test_fraction)
    strata = sorted({key(r) for r in records})
    index = {s: i for i, s in enumerate(strata)}
    parts = stratified_split([index[key(r)] for r in records], val_fraction, test_fraction, seed)
    return {name: [records[i] for i in idx] for name, idx in parts.items()}


def grouped_record_split(
    records: Sequence[DetectionRecord],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratum: Callable[[DetectionRecord], str] = lambda r: r.image_class,
) -> dict[str, list[DetectionRecord]]:
    """Split whole groups (``record.group``; a record without one is its own group).

    Within each stratum (a group's first record's ``stratum``, e.g. the magnetic tile class) the
    groups are shuffled (seeded) and dealt to test, then val, until each holds its fraction of
    the stratum's *images*; the rest go to train. A stratum with a single group goes to train.
    """
    _check(val_fraction, test_fraction)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.group if r.group is not None else f"\0{r.path}"].append(i)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g, idx in groups.items():
        by_stratum[stratum(records[idx[0]])].append(g)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for s in sorted(by_stratum):
        names = sorted(by_stratum[s])
        order = [names[k] for k in rng.permutation(len(names))]
        total = sum(len(groups[g]) for g in order)
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        filled = {"test": 0, "val": 0}
        for g in order:
            size = len(groups[g])
            dest = "train"
            if len(order) > 1:
                for split in ("test", "val"):
                    # take the group while it brings the split closer to its target
                    if abs(filled[split] + size - targets[split]) < abs(filled[split] - targets[split]):
                        dest = split
                        break
            if dest != "train":
                filled[dest] += size
            out[dest] += groups[g]
    return {name: [records[i] for i in sorted(idx)] for name, idx in out.items()}
