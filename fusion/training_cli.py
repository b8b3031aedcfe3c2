"""lineside training entry point (Lightning CLI).

    python train.py fit --config configs/quickstart.yaml
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
    python train.py fit --config configs/el_grading.yaml --data.root /data/my_cells   # ImageFolder
    python train.py fit --config configs/el_grading.yaml --data.manifest cells.csv    # CSV manifest
    python train.py fit --config configs/quickstart.yaml --print_config

Subcommands: fit, validate, test, predict. The resolved config is saved in the run folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lineside.fusion.datamodule import InspectionDataModule  # noqa: E402
from lineside.fusion.lightning_module import InspectionModule  # noqa: E402

__all__ = ["main"]


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        InspectionModule,
        InspectionDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"description": "lineside: train and evaluate inspection models"},
    )


if __name__ == "__main__":
    main()
