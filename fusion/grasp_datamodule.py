"""GraspDataModule: partial depth-camera views of parts with antipodal grasp labels, for the grasp head.

Splits:

* ``train``: :class:`~lineside.pointcloud.grasp_dataset.PartGraspDataset` (procedural parts,
  ``num_train`` views, seed ``seed``), plus ``train_tool_views`` views of each of ``train_tools``
  (real workshop tools, seed ``seed + 1000``) when given;
* ``val``: procedural views with seed ``seed + 1`` (other parts, other poses);
* ``test`` / ``predict``: :class:`~lineside.pointcloud.grasp_dataset.WorkshopToolsDataset` views of
  the real tools in ``tools_root`` (``views_per_tool`` each, seed ``seed + 2``), by default every
  tool (a model trained on procedural parts only has seen none of them). Leave-tools-out:
  ``test_tools`` names the held-out tools, or ``fold`` / ``num_folds`` deals the sorted tool names
  round-robin into folds; ``train_tools`` (a list, or ``"rest"`` = every tool not held out) adds
  tools to training and may never name a held-out tool.

Point preparation (recorded as :attr:`GraspDataModule.point_config` in every checkpoint under
``checkpoint["lineside"]["points"]``, so deployment prepares clouds the same way):

1. the cloud in the sensor (camera) frame, metres, camera at the origin;
2. statistical outlier removal (``outlier_neighbors`` = 20 neighbours, ``outlier_std`` = 2.0);
3. voxel downsampling (``voxel_size`` m; points averaged per voxel);
4. normals (``features == "normals"``): open3d hybrid search, radius ``normal_radius`` m, at most
   ``normal_max_nn`` = 30 neighbours, oriented toward the camera at the sensor origin;
5. normalisation of the downsampled cloud (all its points, **before** fixed-size sampling):
   ``center = mean(points)`` (centroid, sensor metres) and
   ``scale = max ||points - center||`` (radius of the enclosing ball about the centroid, metres; 1.0
   when 0), ``normalised = (sensor - center) / scale``; normals are not scaled;
6. fixed size: ``num_points`` rows sampled without replacement (seeded) or zero-padded at the end,
   with ``point_mask`` True for real rows.

The model sees ``points`` (normalised), ``point_mask`` and ``point_features`` (the normals, or none);
decoded grasps go back to sensor metres with ``position * scale + center`` and ``width * scale``
(:class:`~lineside.fusion.grasp_decoder.GraspDecoder`).

Batches: :func:`~lineside.pointcloud.grasp_dataset.collate` (``points``, ``point_mask``, ``features``,
``grasps``, ``grasp_mask``, ``center``, ``scale``, ``part_id``, ``mesh``) plus ``point_features``
(= ``features``, or absent when ``features`` is None) and ``grade`` (B,) -1 (no grade labels).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lineside.fusion.split_loaders import SplitLoadersMixin

__all__ = ["GraspDataModule", "grasp_collate"]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """``$LINESIDE_CACHE/grasp``, else ``~/.cache/lineside/grasp``."""
    base = os.environ.get("LINESIDE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "lineside") / "grasp"


def grasp_collate(samples: list[dict]) -> dict:
    """:func:`~lineside.pointcloud.grasp_dataset.collate` plus ``point_features`` (the normals, when
    the samples carry them) and ``grade`` (B,) -1, so multi-task criteria see which tasks a batch supervises."""
    from lineside.pointcloud.grasp_dataset import collate

    batch = collate(samples)
    if "features" in batch:
        batch["point_features"] = batch["features"]
    batch["grade"] = torch.full((len(samples),), -1, dtype=torch.int64)
    return batch


def _drop_features(samples: list[dict]) -> dict:
    batch = grasp_collate([{**s, "features": None} for s in samples])
    batch.pop("features", None)
    return batch


def _nothing(_):
    return None


class GraspDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Procedural parts for training/validation, real workshop tools (held out) for test/predict.

    Args:
        num_train: procedural training views. num_val: procedural validation views.
        tools_root: the ``workshop_tools`` folder; default ``../shared/data/workshop_tools`` beside
            the repository. Needed for test/predict and for ``train_tools``.
        views_per_tool: test views per held-out tool.
        test_tools: held-out tool names (default: every tool, or the ``fold``'s).
        fold / num_folds: hold out fold ``fold`` of ``num_folds`` (sorted names dealt round-robin).
        train_tools: tools added to training (names, or ``"rest"`` for every tool not held out).
        train_tool_views: training views per training tool.
        num_points: points per cloud. features: ``"normals"`` (3 feature channels) or None.
        voxel_size, normal_radius: preprocessing (m).
        distance: camera distance range for procedural parts (m); tool_distance: for tools.
        noise_std: depth noise (m). dropout: lost returns. mu: friction coefficient.
        max_width, finger_depth: the parallel-jaw gripper (m), for labels and the analytic check.
        num_samples: surface samples per view for the labeller.
        batch_size, num_workers: loaders (workers also generate uncached views in parallel).
        seed: view seeds (train ``seed``, val ``seed + 1``, test ``seed + 2``, train tools ``seed + 1000``).
        cache_dir: view cache root; default ``$LINESIDE_CACHE/grasp`` else ``~/.cache/lineside/grasp``.
        predict_split: which split ``predict`` runs on.
        intensity_size: also give every view the camera's grey intensity image, ``image`` (B, 1, S, S) uint8
            (RGB-D: same pose and intrinsics as the depth, central square resampled to S; see
            :func:`~lineside.pointcloud.parts.render_intensity`), so a model with an image encoder
            fuses image and point tokens. Enters the view cache key. (Not called ``image_size``: the CLI
            carries same-named arguments of its default image data module over to this class.)
    """

    task = "grasp"

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 64,
        tools_root: str | None = None,
        views_per_tool: int = 4,
        test_tools: list[str] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        train_tools: list[str] | Literal["rest"] | None = None,
        train_tool_views: int = 16,
        num_points: int = 1024,
        features: Literal["normals"] | None = "normals",
        voxel_size: float = 0.002,
        normal_radius: float = 0.01,
        distance: tuple[float, float] = (0.3, 0.5),
        tool_distance: tuple[float, float] = (0.5, 0.7),
        noise_std: float = 0.0005,
        dropout: float = 0.02,
        mu: float = 0.5,
        max_width: float = 0.08,
        finger_depth: float = 0.04,
        num_samples: int = 300,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        intensity_size: int | None = None,
    ) -> None:
        super().__init__()
        if features not in ("normals", None):
            raise ValueError(f"data.features must be 'normals' or null, got {features!r}")
        if fold is not None and not 0 <= fold < num_folds:
            raise ValueError(f"data.fold {fold} outside 0..{num_folds - 1} (num_folds={num_folds})")
        if fold is not None and test_tools is not None:
            raise ValueError("give data.test_tools or data.fold, not both")
        self.save_hyperparameters()
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.tools_root = tools_root
        self.views_per_tool, self.train_tool_views = int(views_per_tool), int(train_tool_views)
        self.test_tools_arg, self.fold, self.num_folds, self.train_tools_arg = test_tools, fold, int(num_folds), train_tools
        self.features = features
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.predict_split = predict_split
        self.image_size = int(intensity_size) if intensity_size else None  # S of the views' images, recorded in checkpoints
        self._view = dict(num_points=int(num_points), voxel_size=float(voxel_size), normal_radius=float(normal_radius),
                          noise_std=float(noise_std), dropout=float(dropout), mu=float(mu), num_samples=int(num_samples))
        self.distance, self.tool_distance = tuple(distance), tuple(tool_distance)
        self.max_width, self.finger_depth = float(max_width), float(finger_depth)
        self._datasets: dict[str, Dataset] = {}

    # -- configuration ---------------------------------------------------------------------
    @property
    def gripper(self):
        from lineside.pointcloud.grasp_labels import ParallelJawGripper

        return ParallelJawGripper(max_width=self.max_width, finger_depth=self.finger_depth)

    def view_config(self, tools: bool = False):
        """The :class:`~lineside.pointcloud.grasp_dataset.GraspViewConfig` of procedural (or tool) views."""
        from lineside.pointcloud.grasp_dataset import GraspViewConfig

        return GraspViewConfig(distance=self.tool_distance if tools else self.distance, gripper=self.gripper, **self._view)

    @property
    def point_config(self) -> dict:
        """How clouds are prepared for the model (see the module docstring); stored in checkpoints."""
        return {
            "num_points": self._view["num_points"],
            "features": self.features,
            "voxel_size": self._view["voxel_size"],
            "normal_radius": self._view["normal_radius"],
            "normal_max_nn": 30,
            "normal_orientation": "toward the sensor origin",
            "outlier_neighbors": 20,
            "outlier_std": 2.0,
            "center": "centroid",  # mean of the preprocessed (voxelised) points, before fixed-size sampling
            "scale": "max_radius",  # max distance of those points from the centroid (1.0 when 0)
            "normalization": "normalised = (sensor - center) / scale; sensor = normalised * scale + center; width_m = width * scale",
            "frame": "sensor",
            "units": "m",
            "mu": self._view["mu"],
            "gripper": asdict(self.gripper),
        }

    @property
    def source(self) -> str:
        return f"procedural parts + {self.resolved_tools_root}"

    @property
    def resolved_tools_root(self) -> Path:
        return Path(self.tools_root).expanduser() if self.tools_root else _REPO.parent / "shared" / "data" / "workshop_tools"

    def all_tools(self) -> list[str]:
        """Tool names of ``manifest.csv`` (sorted) whose ``tools/<name>/mesh.ply`` exists."""
        root = self.resolved_tools_root
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"workshop tools not found: {manifest} is missing; give the folder with --data.tools_root "
                "(default: ../shared/data/workshop_tools beside the repository)"
            )
        with open(manifest, newline="") as f:
            names = [r["object"] for r in csv.DictReader(f)]
        return sorted(n for n in names if (root / "tools" / n / "mesh.ply").is_file())

    def tool_split(self) -> tuple[list[str], list[str]]:
        """``(test_tools, train_tools)`` after the leave-tools-out options (disjoint)."""
        tools = self.all_tools()
        if self.test_tools_arg is not None:
            unknown = sorted(set(self.test_tools_arg) - set(tools))
            if unknown:
                raise ValueError(f"data.test_tools {unknown} not in {self.resolved_tools_root / 'manifest.csv'}; known: {tools}")
            test = [t for t in tools if t in set(self.test_tools_arg)]
        elif self.fold is not None:
            test = tools[self.fold :: self.num_folds]
        else:
            test = tools
        if self.train_tools_arg is None:
            train: list[str] = []
        elif self.train_tools_arg == "rest":
            train = [t for t in tools if t not in test]
        else:
            unknown = sorted(set(self.train_tools_arg) - set(tools))
            if unknown:
                raise ValueError(f"data.train_tools {unknown} not in {self.resolved_tools_root / 'manifest.csv'}; known: {tools}")
            leak = sorted(set(self.train_tools_arg) & set(test))
            if leak:
                raise ValueError(f"data.train_tools {leak} are held out for test: a tool is either trained on or tested, not both")
            train = [t for t in tools if t in set(self.train_tools_arg)]
        return test, train

    # -- datasets --------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The split's dataset (built once; uncached views are generated with a progress bar)."""
        if split in self._datasets:
            return self._datasets[split]
        from lineside.pointcloud.grasp_dataset import PartGraspDataset, WorkshopToolsDataset

        cache = self.cache_dir
        if split == "train":
            ds: Dataset = PartGraspDataset(self.num_train, self.view_config(), seed=self.seed, cache_dir=cache,
                                          image_size=self.image_size)
            _, train_tools = self.tool_split() if self.train_tools_arg is not None else ([], [])
            if train_tools:
                tools = WorkshopToolsDataset(self.resolved_tools_root, train_tools, self.train_tool_views,
                                             self.view_config(tools=True), seed=self.seed + 1000, cache_dir=cache,
                                             image_size=self.image_size)
                ds = ConcatDataset([ds, tools])
                log.info("training adds %d views of tools %s", len(tools), train_tools)
        elif split == "val":
            ds = PartGraspDataset(self.num_val, self.view_config(), seed=self.seed + 1, cache_dir=cache,
                                  image_size=self.image_size)
        elif split == "test":
            test_tools, _ = self.tool_split()
            ds = WorkshopToolsDataset(self.resolved_tools_root, test_tools, self.views_per_tool,
                                      self.view_config(tools=True), seed=self.seed + 2, cache_dir=cache,
                                      image_size=self.image_size)
        else:
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        self._generate(ds, split)
        self._datasets[split] = ds
        return ds

    def _generate(self, ds: Dataset, split: str) -> None:
        """Render and label every uncached view once (in ``num_workers`` processes), with a progress bar."""
        parts = ds.datasets if isinstance(ds, ConcatDataset) else [ds]
        missing = sum(sum(1 for i in range(len(p)) if not (p.cache_dir / f"{i}.npz").exists()) for p in parts)
        if not missing:
            return
        log.info("grasp %s: generating %d of %d views into %s", split, missing, len(ds), self.cache_dir)
        loader = DataLoader(ds, batch_size=1, num_workers=self.num_workers, collate_fn=_nothing)
        try:
            from tqdm.auto import tqdm

            it = tqdm(loader, desc=f"grasp {split} views", total=len(ds), mininterval=5.0)
        except ImportError:  # pragma: no cover - tqdm ships with lightning
            it = loader
        for i, _ in enumerate(it):
            if (i + 1) % 200 == 0:
                log.info("grasp %s: %d / %d views", split, i + 1, len(ds))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.dataset("train")
        if stage in ("fit", "validate", None):
            self.dataset("val")
        if stage == "test":
            self.dataset("test")
        if stage == "predict":
            self.dataset(self.predict_split)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        return self._split_loader(self.dataset(split), split, train, grasp_collate if self.features == "normals" else _drop_features)
