"""WaferMapDataModule: wafer-map pattern classes, generated or read from a WM-811K-style pickle."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
from lineside.fusion.split_loaders import SplitLoadersMixin, finish_splits
from lineside.vision.splits import stratified_split
from lineside.vision.wafer_dataset import WaferMapDataset
from lineside.vision.wafer_io import WM811K_CLASSES, WaferMapRecord, read_lswmd
from lineside.vision.wafer_synth import WAFER_SPECS, generated_wafer_records
from torch.utils.data import DataLoader

__all__ = ["WaferMapDataModule"]

log = logging.getLogger(__name__)

_SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


class WaferMapDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Wafer maps + pattern classes for training, validation, test and prediction.

    ``source: generated`` makes maps with :mod:`vision.wafer_synth` (**generated**, not measured: a
    stand-in until a fab's own data is used); train, val and test are independent draws (their own
    seeds). Any other ``source`` is a WM-811K-style pickle (``LSWMD.pkl``) read by
    :func:`vision.wafer_io.read_lswmd`: its ``Training`` rows are train (a stratified ``val_fraction``
    of them becomes val), its ``Test`` rows test; rows without a split are split here, stratified.
    Unlabelled rows are dropped (``labelled_only``).

    Args:
        source: ``"generated"`` or the path of a WM-811K-style pickle.
        wafer: generated maps' wafer size, ``"8inch"`` or ``"12inch"``.
        num_train, num_val, num_test: generated maps per split.
        class_probs: generated maps' share of each class (default: equal).
        class_names: the pattern classes, index = label; default WM-811K's nine (``none`` first).
        image_size: side of the square model input.
        channels: 1 (grey levels 0/127/255) or 3 (one plane per die state).
        batch_size: batch size of every loader.
        num_workers: loader workers.
        augment: rotations / flips of the die grid for training.
        val_fraction, test_fraction: shares for the pickle's rows without a split (val: also of its train rows).
        labelled_only: drop a pickle's unlabelled rows.
        seed: generator and split seed.
        limit: keep at most this many maps per split (quick runs and tests).
        predict_split: which split ``predict`` runs on.
    """

    def __init__(
        self,
        source: str = "generated",
        wafer: Literal["8inch", "12inch"] = "8inch",
        num_train: int = 4500,
        num_val: int = 450,
        num_test: int = 900,
        class_probs: list[float] | None = None,
        class_names: list[str] | None = None,
        image_size: int = 64,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        labelled_only: bool = True,
        seed: int = 0,
        limit: int | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
    ) -> None:
        super().__init__()
        if wafer not in WAFER_SPECS:
            raise ValueError(f"data.wafer {wafer!r}: choose one of {sorted(WAFER_SPECS)}")
        if source == "generated" and class_names and list(class_names) != list(WM811K_CLASSES):
            raise ValueError(f"generated maps carry WM-811K's classes {list(WM811K_CLASSES)}; got class_names {class_names}")
        self.save_hyperparameters()
        self.source_arg, self.wafer = source, wafer
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.class_probs = class_probs
        self.class_names = list(class_names or WM811K_CLASSES)
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers, self.augment = batch_size, num_workers, augment
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.labelled_only = labelled_only
        self.seed, self.limit, self.predict_split = seed, limit, predict_split
        self.splits: dict[str, list[WaferMapRecord]] | None = None

    @property
    def source(self) -> str:
        return f"generated {self.wafer} wafer maps" if self.source_arg == "generated" else str(self.source_arg)

    def _generated(self) -> dict[str, list[WaferMapRecord]]:
        counts = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        if self.limit:
            counts = {s: min(n, self.limit) for s, n in counts.items()}
        return {s: generated_wafer_records(n, self.wafer, self.seed + _SPLIT_SEED_OFFSET[s], self.class_probs, split=s)
                for s, n in counts.items()}

    def _from_pickle(self) -> dict[str, list[WaferMapRecord]]:
        path = Path(self.source_arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"wafer-map data {path} not found: give data.source generated or a WM-811K-style pickle (LSWMD.pkl)")
        records = read_lswmd(path, self.class_names, labelled_only=self.labelled_only)
        parts: dict[str, list[WaferMapRecord]] = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
        loose = [r for r in records if r.split is None]
        if loose:
            idx = stratified_split([r.label for r in loose], self.val_fraction, self.test_fraction, self.seed)
            for s in parts:
                parts[s] += [loose[i] for i in idx[s]]
        if not parts["val"] and parts["train"]:  # WM-811K gives Training / Test only: val from train, stratified
            train = parts["train"]
            idx = stratified_split([r.label for r in train], self.val_fraction, 0.0, self.seed)
            parts["train"], parts["val"] = [train[i] for i in idx["train"]], [train[i] for i in idx["val"]]
        return parts

    def prepare_splits(self) -> dict[str, list[WaferMapRecord]]:
        """Generate or read the maps and split them (idempotent)."""
        if self.splits is None:
            parts = self._generated() if self.source_arg == "generated" else self._from_pickle()
            self.splits = finish_splits(parts, self.limit, self.source, log)
        return self.splits

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        """Labelled training maps per class."""
        counts = Counter(r.label for r in self.prepare_splits()["train"] if r.label >= 0)
        return [counts.get(i, 0) for i in range(self.num_classes)]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()

    def dataset(self, split: str, train: bool = False, records: Sequence[WaferMapRecord] | None = None) -> WaferMapDataset:
        """The maps of ``split`` (or ``records``) as a :class:`WaferMapDataset`, augmented when ``train``."""
        recs = self.prepare_splits()[split] if records is None else records
        return WaferMapDataset(recs, self.image_size, self.channels, augment=train and self.augment)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        return self._split_loader(self.dataset(split, train), split, train)
