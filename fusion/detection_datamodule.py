"""DetectionDataModule: box-labelled defect images (NEU-DET, magnetic tile, DeepPCB) for the localization head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lineside.fusion.split_loaders import SplitLoadersMixin, finish_splits
from lineside.vision.box_formats import read_deeppcb, read_magnetic_tile, read_neu_det
from lineside.vision.box_records import DetectionRecord
from lineside.vision.box_splits import grouped_record_split, stratified_record_split
from lineside.vision.detection_data import (
    DetectionDataset,
    build_detection_eval_transform,
    build_detection_train_transform,
    detection_collate,
)

__all__ = ["DetectionDataModule", "localization_collate"]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
_READERS = {"neu_det": read_neu_det, "magnetic_tile": read_magnetic_tile, "deeppcb": read_deeppcb}


def localization_collate(samples: list[dict]) -> dict:
    """:func:`detection_collate` plus ``has_boxes`` (B,) True (every sample is box-labelled) and
    ``grade`` (B,) -1 (no grade labels), so multi-task criteria see which tasks a batch supervises."""
    batch = detection_collate(samples)
    b = len(samples)
    batch["has_boxes"] = torch.ones(b, dtype=torch.bool)
    batch["grade"] = torch.full((b,), -1, dtype=torch.int64)
    return batch


class DetectionDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Box- (and mask-) labelled images for training, validation and test of the localization head.

    Splits (seeded by ``seed``, fractions ``val_fraction`` / ``test_fraction``):

    - ``neu_det``: image by image, stratified by the file-prefix class;
    - ``deeppcb``: image by image, stratified by board group (as DeepPCB's own random split);
    - ``magnetic_tile``: whole tiles (``tile_group``: one tile under ~6 lightings) per split,
      stratified by class, so no tile straddles train and test.

    Args:
        dataset: ``neu_det``, ``magnetic_tile`` or ``deeppcb``.
        root: the dataset folder; default ``../shared/data/<dataset>`` beside the repository.
            A relative path is taken from the working directory.
        image_size: side of the square model input.
        channels: 1 (grayscale; all three sets are) or 3.
        batch_size: batch size of every loader.
        num_workers: decoding workers per loader.
        val_fraction, test_fraction: shares of images (magnetic tile: of images, dealt in whole tiles).
        seed: split and augmentation seed.
        limit: keep at most this many images per split (quick runs and tests).
        predict_split: which split ``predict`` runs on.

    Batches: :func:`localization_collate` (keys in :mod:`lineside.vision.detection_data`, plus
    ``has_boxes`` and ``grade``).
    """

    task = "localization"

    def __init__(
        self,
        dataset: Literal["neu_det", "magnetic_tile", "deeppcb"] = "neu_det",
        root: str | None = None,
        image_size: int = 192,
        channels: int = 1,
        batch_size: int = 16,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
    ) -> None:
        super().__init__()
        if dataset not in _READERS:
            raise ValueError(f"data.dataset {dataset!r}: choose one of {sorted(_READERS)}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = root
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed, self.limit, self.predict_split = seed, limit, predict_split
        self.splits: dict[str, list[DetectionRecord]] | None = None
        self._class_names: list[str] | None = None

    @property
    def source(self) -> str:
        return str(self.resolved_root)

    @property
    def resolved_root(self) -> Path:
        return Path(self.root).expanduser() if self.root else _REPO.parent / "shared" / "data" / self.dataset

    def prepare_splits(self) -> dict[str, list[DetectionRecord]]:
        """Read the records and split them (idempotent)."""
        if self.splits is not None:
            return self.splits
        root = self.resolved_root
        if not root.is_dir():
            raise FileNotFoundError(
                f"{self.dataset} data folder {root} not found; give its location with --data.root "
                f"(default: ../shared/data/{self.dataset} beside the repository)"
            )
        records, names = _READERS[self.dataset](root)
        if self.dataset == "magnetic_tile":
            parts = grouped_record_split(records, self.val_fraction, self.test_fraction, self.seed)
        elif self.dataset == "deeppcb":
            parts = stratified_record_split(records, self.val_fraction, self.test_fraction, self.seed, key=lambda r: r.group or "")
        else:
            parts = stratified_record_split(records, self.val_fraction, self.test_fraction, self.seed)
        self.splits = finish_splits(parts, self.limit, f"{root} ({self.dataset})", log)
        self._class_names = list(names)
        return self.splits

    @property
    def class_names(self) -> list[str]:
        """Defect (box) class names, index = box label."""
        self.prepare_splits()
        return list(self._class_names or [])

    @property
    def box_class_names(self) -> list[str]:
        return self.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()

    def _dataset(self, split: str, train: bool) -> DetectionDataset:
        records = self.prepare_splits()[split]
        transform = (build_detection_train_transform(self.image_size, seed=self.seed) if train
                     else build_detection_eval_transform(self.image_size))
        return DetectionDataset(records, transform, self.channels)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        return self._split_loader(self._dataset(split, train), split, train, localization_collate)

