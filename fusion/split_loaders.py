"""SplitLoadersMixin: the train/val/test/predict loaders of a data module, built one way.

A data module that has its splits (``prepare_splits``) and one dataset per split mixes this in
beside :class:`lightning.LightningDataModule` and implements ``_loader(split, train)``, usually
as ``self._split_loader(dataset, split, train, collate_fn)``. Shared by the grading, detection
and grasp data modules.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitLoadersMixin", "finish_splits"]

R = TypeVar("R")


def finish_splits(parts: dict[str, list[R]], limit: int | None, source: str, log: logging.Logger) -> dict[str, list[R]]:
    """Keep at most ``limit`` records per split, refuse an empty train split and log the sizes."""
    if limit:
        parts = {s: v[:limit] for s, v in parts.items()}
    if not parts["train"]:
        raise ValueError(f"{source}: no training images after splitting")
    log.info("data %s: %s", source, {s: len(v) for s, v in parts.items()})
    return parts


class SplitLoadersMixin:
    """The four Lightning dataloader hooks over one ``_loader(split, train=False)`` method.

    Expects ``batch_size``, ``num_workers``, ``seed``, ``predict_split`` and ``source`` on the module.
    """

    predict_split: str
    batch_size: int
    num_workers: int
    seed: int
    source: str

    def _loader(self, split: str, train: bool = False) -> DataLoader:  # pragma: no cover - abstract
        raise NotImplementedError

    def _split_loader(self, dataset: Dataset | Sequence, split: str, train: bool, collate_fn: Callable | None = None,
                      seeded: bool = True) -> DataLoader:
        """A loader over ``split``'s dataset: shuffled when ``train`` (by a generator seeded with ``seed``
        when ``seeded``, else by torch's global seed) and then without a ragged last batch."""
        if len(dataset) == 0:
            raise ValueError(f"{self.source}: the {split!r} split is empty")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            drop_last=train and len(dataset) > self.batch_size,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train and seeded else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split)
