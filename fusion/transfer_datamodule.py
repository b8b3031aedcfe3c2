"""TransferDataModule: a few labelled cells of a new product, its unlabelled cells and the old product's cells.

    lineside fit --config configs/elpv_mono_poly.yaml

Built on :class:`lineside.fusion.datamodule.InspectionDataModule`'s module-block split of ELPV (or a
manifest with a ``text`` column naming each cell's type); then, within the split:

* ``train`` (labelled): ``labels`` cells of ``target_type`` from the train blocks, drawn per grade in
  proportion to the grades there (seeded by ``label_seed``; at least one of every grade present);
* ``unlabelled``: the other ``target_type`` train-block cells, their labels hidden (grade -1), served
  as two augmented views (``image``, ``image2``) for the contrastive term;
* ``source``: the ``source_type`` train-block cells, labelled (replay and the MMD's source side);
* ``val`` / ``test``: the ``target_type`` cells of the val / test blocks (held-out modules).

The training loader is a dict ``{"labelled", "source", "unlabelled"}`` (the last two when
``source_replay`` / ``unlabelled`` are on), read by :class:`lineside.fusion.transfer.DomainTransferModule`.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from lineside.fusion.datamodule import InspectionDataModule, filter_cell_type
from lineside.vision.image_dataset import InspectionImageDataset
from lineside.vision.records import ImageRecord
from lineside.vision.transforms import build_train_transform
from torch.utils.data import Dataset

__all__ = ["TransferDataModule", "TwoViews", "pick_labelled"]

log = logging.getLogger(__name__)


def pick_labelled(labels: list[int], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` items drawn per class in proportion to the class counts (at least one of each class present)."""
    if n >= len(labels):
        return list(range(len(labels)))
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    quota = {c: max(1, round(n * float((y == c).mean()))) for c in classes}
    while sum(quota.values()) > n:  # rounding up the rare classes: take back from the largest
        quota[max(quota, key=quota.get)] -= 1
    while sum(quota.values()) < n:
        quota[max(classes, key=lambda c: (y == c).sum() - quota[c])] += 1
    picked: list[int] = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        picked += rng.choice(idx, size=min(quota[c], len(idx)), replace=False).tolist()
    return sorted(picked)


class TwoViews(Dataset):
    """Two independently augmented views of each image of ``base`` (an :class:`InspectionImageDataset` with a
    random training transform): ``{"image", "image2", "grade": -1, "path"}``."""

    def __init__(self, base: InspectionImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        a, b = self.base[i], self.base[i]
        return {"image": a["image"], "image2": b["image"], "grade": torch.tensor(-1, dtype=torch.long), "path": a["path"]}


class TransferDataModule(InspectionDataModule):
    """Labelled target cells + unlabelled target cells + source cells (see the module docstring).

    Args (beyond :class:`InspectionDataModule`'s; ``cell_type`` is not used here):
        source_type / target_type: cell types (``mono`` / ``poly`` for ELPV, or a manifest's texts).
        labels: labelled target cells.
        label_seed: which ones.
        source_replay: serve the source cells (replay and the MMD's source side).
        unlabelled: serve the unlabelled target cells (two views).
    """

    def __init__(self, *args, source_type: str = "mono", target_type: str = "poly", labels: int = 200, label_seed: int = 0,
                 source_replay: bool = True, unlabelled: bool = True, **kwargs) -> None:
        kwargs.pop("cell_type", None)
        super().__init__(*args, **kwargs)
        self.source_type, self.target_type = source_type, target_type
        self.labels, self.label_seed = int(labels), int(label_seed)
        self.source_replay, self.use_unlabelled = bool(source_replay), bool(unlabelled)
        self.extra: dict[str, list[ImageRecord]] = {}

    def prepare_splits(self) -> dict[str, list[ImageRecord]]:
        if self.splits is not None:
            return self.splits
        full = super().prepare_splits()
        target = filter_cell_type(full["train"], self.target_type, f"{self.source} train")
        pick = set(pick_labelled([r.label for r in target], self.labels, self.label_seed))
        labelled = [r for i, r in enumerate(target) if i in pick]
        self.extra = {
            "unlabelled": [ImageRecord(r.path, -1, r.split, r.text) for i, r in enumerate(target) if i not in pick],
            "source": filter_cell_type(full["train"], self.source_type, f"{self.source} train"),
        }
        self.splits = {"train": labelled, "val": filter_cell_type(full["val"], self.target_type, f"{self.source} val"),
                       "test": filter_cell_type(full["test"], self.target_type, f"{self.source} test")}
        log.info("transfer %s → %s: %d labelled (%s), %d unlabelled, %d source cells; val %d, test %d",
                 self.source_type, self.target_type, len(labelled), dict(sorted(Counter(r.label for r in labelled).items())),
                 len(self.extra["unlabelled"]), len(self.extra["source"]), len(self.splits["val"]), len(self.splits["test"]))
        return self.splits

    def train_dataloader(self):
        self.prepare_splits()
        loaders = {"labelled": self._loader("train", train=True)}
        tf = build_train_transform(self.image_size, self.augment)
        if self.source_replay:
            loaders["source"] = self._split_loader(InspectionImageDataset(self.extra["source"], tf, self.channels), "source", True, seeded=False)
        if self.use_unlabelled:
            views = TwoViews(InspectionImageDataset(self.extra["unlabelled"], tf, self.channels))
            loaders["unlabelled"] = self._split_loader(views, "unlabelled", True, seeded=False)
        return loaders
