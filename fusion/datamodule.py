"""InspectionDataModule: built-in ELPV cells, or the user's ImageFolder tree / CSV manifest."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from lineside.fusion.split_loaders import SplitLoadersMixin, finish_splits
from lineside.vision.elpv import ELPV_GRADE_NAMES, elpv_records
from lineside.vision.image_dataset import InspectionImageDataset
from lineside.vision.records import ImageRecord, dedupe_records, records_from_image_folder, records_from_manifest
from lineside.vision.splits import block_split, fold_split, stratified_split
from lineside.vision.transforms import build_eval_transform, build_train_transform

__all__ = ["InspectionDataModule", "filter_cell_type"]

log = logging.getLogger(__name__)

CELL_TYPES = {"mono": "monocrystalline", "poly": "polycrystalline"}  # ELPV's type column → its record text


def filter_cell_type(records: list[ImageRecord], cell_type: str, where: str = "records") -> list[ImageRecord]:
    """The records of one cell type: ``mono`` / ``poly`` (ELPV), or an exact text of a manifest's ``text`` column."""
    want = CELL_TYPES.get(cell_type, cell_type)
    kept = [r for r in records if r.text == want]
    if records and not kept:
        seen = sorted({str(r.text) for r in records})[:6]
        raise ValueError(f"{where}: no {cell_type!r} cells (types present: {seen}); use mono, poly or a text of the manifest")
    return kept


class InspectionDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Images + grades for training, validation, test and prediction.

    With neither ``root`` nor ``manifest`` it serves the built-in ELPV electroluminescence
    cells (installed with the ``elpv-dataset`` package). ``root`` reads an ImageFolder tree
    (``root/{train,val,test}/<class>/*``), ``manifest`` a CSV (``path,label[,split][,text]``).
    Records without a split are split here, seeded: ``split="block"`` keeps contiguous index
    blocks together (pieces of one module/part never straddle train and test), ``"stratified"``
    keeps each class's share.

    Args:
        root: ImageFolder root.
        manifest: CSV manifest.
        class_names: class order (grades from least to most severe); default: ELPV's
            ``ok, mild, moderate, severe`` for the built-in data, else sorted folder/label names.
        image_size: side of the square model input.
        channels: 1 (grayscale) or 3 (RGB).
        batch_size: batch size of every loader.
        num_workers: decoding workers per loader.
        augment: train augmentation, ``"inspection"``, ``"camera"`` (inspection + sub-grey-level
            noise and JPEG round trips of the raw frame), ``"light"`` or ``"none"``
            (:func:`vision.transforms.build_train_transform`).
        split: ``"block"`` or ``"stratified"``, for records without a split.
        block_size: items per block for the block split (ELPV modules hold 60 cells).
        val_fraction: share of items (blocks) for validation.
        test_fraction: share of items (blocks) for test.
        seed: split seed.
        limit: keep at most this many items per split (quick runs and tests).
        predict_split: which split ``predict`` runs on.
        fold: cross-validation fold: train and val are pooled (in index order) and re-split
            into ``num_folds`` folds (by blocks with ``split="block"``); val = this fold. The
            test split is untouched. ``None`` (default): no cross-validation.
        num_folds: number of cross-validation folds.
        text: one prompt for every sample of the run (product, cell type, inspection rule …),
            replacing per-sample texts (ELPV's cell type, a manifest's ``text`` column). Read by
            models with a text encoder; others ignore texts.
        dedupe: ``"md5"`` drops images whose bytes repeat an earlier image's before splitting
            (the count is logged), so no copy sits on both sides of a split; ``"none"`` keeps all.
        cell_type: keep only cells of this type, after splitting (so every split keeps its module
            blocks): ``"mono"`` / ``"poly"`` (ELPV's monocrystalline / polycrystalline cells), or any
            text a manifest's ``text`` column holds. ``None`` (default): every cell.
    """

    def __init__(
        self,
        root: str | None = None,
        manifest: str | None = None,
        class_names: list[str] | None = None,
        image_size: int = 224,
        channels: int = 1,
        batch_size: int = 32,
        num_workers: int = 2,
        augment: Literal["inspection", "camera", "light", "none"] = "inspection",
        split: Literal["block", "stratified"] = "block",
        block_size: int = 60,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        fold: int | None = None,
        num_folds: int = 5,
        text: str | None = None,
        dedupe: Literal["none", "md5"] = "none",
        cell_type: str | None = None,
    ) -> None:
        super().__init__()
        if root and manifest:
            raise ValueError("give either data.root (ImageFolder) or data.manifest (CSV), not both")
        self.save_hyperparameters()
        self.root, self.manifest = root, manifest
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment, self.split = augment, split
        self.block_size, self.val_fraction, self.test_fraction = block_size, val_fraction, test_fraction
        self.seed, self.limit, self.predict_split = seed, limit, predict_split
        self.fold, self.num_folds = fold, num_folds
        self.text = text
        if dedupe not in ("none", "md5"):
            raise ValueError(f"dedupe must be 'none' or 'md5', got {dedupe!r}")
        self.dedupe = dedupe
        self.cell_type = cell_type
        self.dropped_duplicates = 0
        self._class_names = class_names
        self.splits: dict[str, list[ImageRecord]] | None = None

    @property
    def source(self) -> str:
        return self.manifest or self.root or "elpv (built-in)"

    def _load(self) -> tuple[list[ImageRecord], list[str]]:
        if self.manifest:
            return records_from_manifest(self.manifest, self._class_names)
        if self.root:
            return records_from_image_folder(self.root, self._class_names)
        return elpv_records(), list(self._class_names or ELPV_GRADE_NAMES)

    def prepare_splits(self) -> dict[str, list[ImageRecord]]:
        """Read the records and split them (idempotent)."""
        if self.splits is not None:
            return self.splits
        records, self.class_names = self._load()
        if self.dedupe == "md5":
            records, self.dropped_duplicates = dedupe_records(records, self.source)
        if not any(r.split in ("val", "test") for r in records):
            records = [ImageRecord(r.path, r.label, None, r.text) for r in records]  # only a train split given: split it here
        fixed = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        loose = [r for r in records if r.split is None]
        if loose:
            labels = [r.label for r in loose]
            fn = block_split if self.split == "block" else stratified_split
            kwargs = {"block_size": self.block_size} if self.split == "block" else {}
            idx = fn(labels, val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed, **kwargs)
            for s in fixed:
                fixed[s] += [loose[i] for i in idx[s]]
        if self.fold is not None:
            # pool train + val back in index order (whole blocks stay contiguous), then re-split
            pos = {id(r): i for i, r in enumerate(loose)}
            pool = sorted(fixed["train"] + fixed["val"], key=lambda r: pos.get(id(r), -1))
            block = self.block_size if self.split == "block" else None
            idx = fold_split([r.label for r in pool], self.num_folds, self.fold, block, self.seed)
            fixed["train"], fixed["val"] = [pool[i] for i in idx["train"]], [pool[i] for i in idx["val"]]
        if self.cell_type is not None:
            fixed = {s: filter_cell_type(v, self.cell_type, f"{self.source} {s}") for s, v in fixed.items()}
        self.splits = finish_splits(fixed, self.limit, self.source, log)
        return self.splits

    @property
    def num_classes(self) -> int:
        self.prepare_splits()
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        """Labelled training images per class."""
        counts = Counter(r.label for r in self.prepare_splits()["train"] if r.label >= 0)
        return [counts.get(i, 0) for i in range(self.num_classes)]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()

    def _dataset(self, split: str, train: bool) -> InspectionImageDataset:
        records = self.prepare_splits()[split]
        tf = build_train_transform(self.image_size, self.augment) if train else build_eval_transform(self.image_size)
        if self.text is not None:
            records = [ImageRecord(r.path, r.label, r.split, self.text) for r in records]
        return InspectionImageDataset(records, tf, self.channels)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        # shuffled by torch's global seed (seed_everything), as this module always has been
        return self._split_loader(self._dataset(split, train), split, train, seeded=False)

