"""lineside training entry point (Lightning CLI): ``lineside fit|validate|test|predict``.

    lineside fit  --config configs/quickstart.yaml                                  # → runs/quickstart/
    lineside test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
    lineside fit  --config configs/el_grading.yaml --data.root /data/my_cells \\
        --data.class_names '[ok, mild, severe]' --model.model.init_args.grading_head.init_args.num_grades 3 \\
        --trainer.default_root_dir runs/my_cells                                     # ImageFolder
    lineside fit  --config configs/el_grading.yaml --data.manifest cells.csv        # CSV manifest
    lineside fit  --config configs/quickstart.yaml --print_config

One run folder, ``trainer.default_root_dir`` (set in each config, moved with
``--trainer.default_root_dir DIR``), holds everything a fit writes:

    DIR/config.yaml                   the resolved config of the fit
    DIR/checkpoints/best.ckpt, last.ckpt
    DIR/logs/version_N/               CSV logs (metrics.csv), one version per fit / validate / test / predict;
                                      test_confusion_matrix.csv and predictions.csv land in theirs
    DIR/tensorboard/version_N/        TensorBoard logs

Loggers without ``save_dir`` and ``ModelCheckpoint`` without ``dirpath`` are placed there by
:class:`InspectionCLI`. ``fit`` refuses a folder that already holds checkpoints of another run
(``--overwrite`` replaces them; ``--ckpt_path DIR/checkpoints/last.ckpt`` resumes that run).
``validate``, ``test`` and ``predict`` with ``--ckpt_path RUN/checkpoints/X.ckpt`` log into ``RUN``
unless ``--trainer.default_root_dir`` is given on the command line.

Class names have one owner, the data module (``--data.class_names``); the CLI links them to the
model's ``class_names``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from jsonargparse import ActionYesNo, Namespace  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402

from lineside.fusion.datamodule import InspectionDataModule  # noqa: E402
from lineside.fusion.lightning_module import InspectionModule  # noqa: E402

__all__ = ["InspectionCLI", "RunConfigCallback", "main"]

_EVAL = ("validate", "test", "predict")
_NUM_GRADES = "model.init_args.grading_head.init_args.num_grades"


def _class(class_path: str | None) -> type | None:
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _init_params(class_path: str | None) -> set[str]:
    cls = _class(class_path)
    try:
        return set(inspect.signature(cls).parameters) if cls is not None else set()
    except (TypeError, ValueError):
        return set()


def _items(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def _init_args(item: Any) -> Namespace | None:
    if not isinstance(item, Namespace) or "class_path" not in item:
        return None
    if item.get("init_args") is None:
        item.init_args = Namespace()
    return item.init_args


def _run_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """``RUN`` for a checkpoint at ``RUN/checkpoints/X.ckpt``, else None."""
    if not ckpt_path:
        return None
    parent = Path(ckpt_path).parent
    return parent.parent if parent.name == "checkpoints" else None


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config: a fit's as ``<default_root_dir>/config.yaml`` (beside its
    ``checkpoints/``), a validate / test / predict's in its own log folder. ``overwrite`` is
    saved as false, so a saved config never replaces a run by itself."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        folder = trainer.default_root_dir if stage == "fit" else trainer.log_dir  # log_dir broadcasts: every rank
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            config = self.config.clone()
            if "overwrite" in config:
                config.overwrite = False
            path = os.path.join(folder, self.config_filename)
            # save_dir / dirpath stay unset (derived from the run folder), so skip the parser's check
            keep_unset = {"skip_unset" if "skip_unset" in inspect.signature(self.parser.save).parameters else "skip_none": False}
            self.parser.save(config, path, overwrite=True, multifile=self.multifile, skip_validation=True, **keep_unset)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class InspectionCLI(LightningCLI):
    """The Lightning CLI of :class:`InspectionModule` + :class:`InspectionDataModule`.

    On top of ``LightningCLI``:

    * ``data.class_names`` is linked to ``model.class_names``: the data module owns the class
      order, the module gets the same list (one value, so the hparams of both always agree);
      an explicit list whose length differs from the grading head's ``num_grades`` stops
      before anything is built.
    * ``trainer.default_root_dir`` is the run folder: loggers without ``save_dir`` and
      ``ModelCheckpoint`` callbacks without ``dirpath`` are placed there (``DIR``,
      ``DIR/checkpoints``) and the fit's resolved config is saved as ``DIR/config.yaml``.
    * ``fit`` never replaces another run's checkpoints unless ``--overwrite`` is given.
    * ``validate`` / ``test`` / ``predict`` with ``--ckpt_path RUN/checkpoints/X.ckpt`` log
      into ``RUN`` (unless ``--trainer.default_root_dir`` is on the command line).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": "lineside: train and evaluate inspection models"})
        super().__init__(InspectionModule, InspectionDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.class_names", "model.class_names")
        parser.add_argument(
            "--overwrite", action=ActionYesNo, nargs="?", default=False,
            help="fit into a run folder (trainer.default_root_dir) that already holds checkpoints: "
            "delete them and train anew (default: refuse)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses, places the run folder's outputs (loggers without ``save_dir`` and checkpoint
        callbacks without ``dirpath`` need it to validate), then validates."""
        raw = sys.argv[1:] if args is None else args
        self._cli_tokens = [a for a in raw if isinstance(a, str)] if isinstance(raw, (list, tuple)) else []
        # validated below, once the run folder is placed (jsonargparse's private flag, as for its own subparsers)
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args, _skip_validation=True)
        else:
            self.config = parser.parse_args(args, _skip_validation=True)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        if cfg.get("ckpt_path"):
            self._class_names_of_checkpoint(cfg)  # the model's grades come from the checkpoint
        else:
            self._check_num_grades(cfg)
        self._place_run(cfg, subcommand)
        try:
            parser.validate(self.config)
        except (TypeError, KeyError) as ex:
            parser.error(str(ex), ex)

    def _given(self, key: str) -> bool:
        flag = f"--{key}"
        return any(t == flag or t.startswith(flag + "=") for t in self._cli_tokens)

    def after_instantiate_classes(self) -> None:
        # the saved config keeps the derived save_dir / dirpath unset: reused, it follows its run folder
        trainer = self.config.get(str(self.subcommand), self.config).trainer
        for section, index, key in self._derived:
            _items(trainer.get(section))[index].init_args[key] = None

    @staticmethod
    def _class_names_of_checkpoint(cfg: Namespace) -> None:
        """Without ``--data.class_names``, a run on a checkpoint reads its class order from it, so
        folder or label names map to the grades the model was trained on."""
        data = cfg.data
        if isinstance(data, Namespace) and "class_path" in data:  # a data module named by class_path
            if "class_names" not in _init_params(data.class_path):
                return
            data = _init_args(data)
        if data.get("class_names") or not Path(cfg.ckpt_path).is_file():
            return
        try:
            meta = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True).get("lineside") or {}
        except Exception:  # not a lineside checkpoint: Lightning reports it
            return
        if meta.get("class_names"):
            data.class_names = list(meta["class_names"])

    @staticmethod
    def _check_num_grades(cfg: Namespace) -> None:
        names = cfg.get("data.class_names")
        try:
            num_grades = cfg.model.get(_NUM_GRADES)
        except (AttributeError, KeyError):
            num_grades = None
        if names and isinstance(num_grades, int) and num_grades != len(names):
            raise ValueError(
                f"data.class_names has {len(names)} names {list(names)} but the grading head has {num_grades} outputs: "
                f"set --model.model.init_args.grading_head.init_args.num_grades {len(names)}"
            )

    def _place_run(self, cfg: Namespace, subcommand: str | None) -> None:
        self._derived: list[tuple[str, int, str]] = []
        self._stale: list[Path] = []
        trainer = cfg.trainer
        ckpt_path = cfg.get("ckpt_path")
        if subcommand in _EVAL and not self._given("trainer.default_root_dir"):
            run = _run_of_checkpoint(ckpt_path)
            if run is not None:
                trainer.default_root_dir = str(run)
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        trainer.default_root_dir = str(root)
        for i, logger in enumerate(_items(trainer.get("logger"))):
            init = _init_args(logger)
            if init is not None and init.get("save_dir") is None and "save_dir" in _init_params(logger.class_path):
                init.save_dir = str(root)
                self._derived.append(("logger", i, "save_dir"))
        ckpt_dirs = []
        for i, callback in enumerate(_items(trainer.get("callbacks"))):
            init = _init_args(callback)
            cls = _class(callback.get("class_path")) if init is not None else None
            if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
                if init.get("dirpath") is None:
                    init.dirpath = str(root / "checkpoints")
                    self._derived.append(("callbacks", i, "dirpath"))
                ckpt_dirs.append(Path(init.dirpath))
        if subcommand == "fit":
            self._guard_checkpoints(ckpt_dirs, ckpt_path, bool(cfg.get("overwrite")))

    def _guard_checkpoints(self, ckpt_dirs: list[Path], ckpt_path: str | None, overwrite: bool) -> None:
        resume_dir = Path(ckpt_path).resolve().parent if ckpt_path else None
        for folder in ckpt_dirs:
            if resume_dir is not None and folder.resolve() == resume_dir:
                continue  # resuming this run: its checkpoints go on
            old = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
            if old and not overwrite:
                run = folder.parent if folder.name == "checkpoints" else folder
                free = next(run.with_name(f"{run.name}_{k}") for k in range(2, 10_000) if not run.with_name(f"{run.name}_{k}").exists())
                raise FileExistsError(
                    f"{folder} already holds checkpoints of an earlier run ({', '.join(p.name for p in old)}); "
                    f"fit does not replace them. Give this run its own folder (--trainer.default_root_dir {free}), "
                    f"resume that run (--ckpt_path {folder / 'last.ckpt'}) or replace it (--overwrite)"
                )
            self._stale += old

    def before_fit(self) -> None:
        # --overwrite: the replaced run's checkpoints go once model, data and trainer are built
        for path in self._stale:
            path.unlink(missing_ok=True)


class AnyDataInspectionCLI(InspectionCLI):
    """:class:`InspectionCLI` whose ``data`` section names its LightningDataModule by ``class_path``
    (e.g. ``lineside.fusion.detection_datamodule.DetectionDataModule`` in ``configs/neu_det.yaml``).

    :func:`main` picks it when a ``--config`` file's ``data`` section has a ``class_path``; plain
    ``data: {...}`` configs keep :class:`InspectionCLI` and its class-name checks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": "lineside: train and evaluate inspection models"})
        LightningCLI.__init__(self, InspectionModule, L.LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"data": {"class_path": "lineside.fusion.datamodule.InspectionDataModule"}})


def _data_has_class_path(args: list[str]) -> bool:
    """Does a ``--config`` file in ``args`` give its ``data`` section as ``class_path``/``init_args``?"""
    import yaml

    for i, a in enumerate(args):
        path = args[i + 1] if a == "--config" and i + 1 < len(args) else a.split("=", 1)[1] if a.startswith("--config=") else None
        if path and Path(path).is_file():
            try:
                cfg = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError:
                continue
            if isinstance(cfg.get("data"), dict) and "class_path" in cfg["data"]:
                return True
    return False


def main(args: list[str] | None = None, **kwargs: Any) -> InspectionCLI:
    argv = list(sys.argv[1:] if args is None else args)
    cli = AnyDataInspectionCLI if _data_has_class_path(argv) else InspectionCLI
    return cli(args=args, **kwargs)


if __name__ == "__main__":
    main()
