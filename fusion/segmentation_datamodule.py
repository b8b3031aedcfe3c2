"""SegmentationDataModule: pixel-mask data sets (EL crack cells, magnetic tile) for the segmentation task
(``lineside.fusion.segmentation_datamodule.SegmentationDataModule``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from lineside.fusion.split_loaders import SplitLoadersMixin, finish_splits
from lineside.vision.box_formats import MAGNETIC_TILE_CLASSES, read_magnetic_tile
from lineside.vision.box_splits import grouped_record_split
from lineside.vision.el_cracks import (
    EL_CRACK_CLASSES,
    ElCracksDataset,
    build_segmentation_eval_transform,
    build_segmentation_train_transform,
    module_split,
    read_el_cracks,
    segmentation_collate,
)
from lineside.vision.record_masks import RecordMaskDataset

__all__ = ["SegmentationDataModule"]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


class SegmentationDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Images with class-index masks, split by physical object (seeded), 70 / 10 / 20 % of images.

    - ``el_cracks``: EL cells, whole modules per split;
    - ``magnetic_tile``: whole tiles (``tile_group``) per split, stratified by class, exactly as
      :class:`~lineside.fusion.detection_datamodule.DetectionDataModule` splits them; a mask's
      pixels take the folder's class (mask value k = ``Blowhole, Break, Crack, Fray, Uneven``[k - 1],
      :class:`lineside.vision.record_masks.RecordMaskDataset`), ``Free`` tiles are all background.

    Args:
        dataset: ``el_cracks`` or ``magnetic_tile``.
        root: the data folder; default ``../shared/data/<dataset>`` beside the repository.
        image_size: side of the square model input (frames: lineside's resize; masks: nearest).
        channels: 1 (EL is grey) or 3.
        batch_size, num_workers: of every loader.
        val_fraction, test_fraction: shares of cells, dealt in whole modules.
        seed: split and augmentation seed.
        limit: keep at most this many cells per split (quick runs and tests).
        predict_split: which split ``predict`` runs on.
        binary: magnetic tile only: one foreground class ``defect`` instead of one per folder.

    Batches: :func:`lineside.vision.el_cracks.segmentation_collate` (``image``, ``seg_mask``,
    ``has_seg``, ``grade``, ``path``).
    """

    task = "segmentation"

    def __init__(
        self,
        dataset: Literal["el_cracks", "magnetic_tile"] = "el_cracks",
        root: str | None = None,
        image_size: int = 256,
        channels: int = 1,
        batch_size: int = 8,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        binary: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in ("el_cracks", "magnetic_tile"):
            raise ValueError(f"data.dataset {dataset!r}: choose el_cracks or magnetic_tile")
        self.save_hyperparameters()
        self.binary = binary
        self.dataset, self.root = dataset, root
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed, self.limit, self.predict_split = seed, limit, predict_split
        self.splits: dict[str, list] | None = None

    @property
    def resolved_root(self) -> Path:
        return Path(self.root).expanduser() if self.root else _REPO.parent / "shared" / "data" / self.dataset

    @property
    def source(self) -> str:
        return str(self.resolved_root)

    @property
    def class_names(self) -> list[str]:
        """Foreground class names, index k = mask value k + 1."""
        if self.dataset == "magnetic_tile":
            return ["defect"] if self.binary else list(MAGNETIC_TILE_CLASSES)
        return list(EL_CRACK_CLASSES[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_splits(self) -> dict[str, list]:
        if self.splits is None:
            root = self.resolved_root
            if not root.is_dir():
                raise FileNotFoundError(f"{self.dataset} data folder {root} not found; give its location with --data.root")
            if self.dataset == "magnetic_tile":
                parts = grouped_record_split(read_magnetic_tile(root)[0], self.val_fraction, self.test_fraction, self.seed)
            else:
                parts = module_split(read_el_cracks(root), self.val_fraction, self.test_fraction, self.seed)
            self.splits = finish_splits(parts, self.limit, f"{root} ({self.dataset})", log)
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        transform = build_segmentation_train_transform(self.image_size, seed=self.seed) if train \
            else build_segmentation_eval_transform(self.image_size)
        records = self.prepare_splits()[split]
        if self.dataset == "magnetic_tile":
            dataset = RecordMaskDataset(records, MAGNETIC_TILE_CLASSES, transform, self.channels, binary=self.binary)
        else:
            dataset = ElCracksDataset(records, transform, self.channels)
        return self._split_loader(dataset, split, train, segmentation_collate)
