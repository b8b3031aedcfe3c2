"""``lineside fit | validate | test | predict``: the Lightning CLI (:mod:`lineside.fusion.training_cli`).

    lineside fit --config configs/quickstart.yaml
    lineside test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
    lineside fit --config configs/quickstart.yaml --print_config

The options are the config's: ``lineside fit --help`` lists them (``--data.*``, ``--model.*``, ``--trainer.*``).
"""

from __future__ import annotations

__all__ = ["main", "SUBCOMMANDS"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Run the Lightning CLI on ``argv`` (``[subcommand, options…]``; ``None``: the process's arguments)."""
    from lineside.fusion.training_cli import main as train_main

    train_main(argv)
    return 0
