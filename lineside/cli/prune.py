"""``lineside prune``: remove a share of the image backbone's channels (structured pruning, torch-pruning).

    lineside prune --model runs/quickstart/checkpoints/best.ckpt --ratio 0.5 --out runs/pruned50/pruned.ckpt
    lineside fit --config configs/quickstart.yaml --model.init_from runs/pruned50/pruned.ckpt \\
        --trainer.max_epochs 1 --trainer.default_root_dir runs/pruned50          # short fine-tune
    lineside export onnx --model runs/pruned50/checkpoints/best.ckpt --out runs/pruned50/export

The pruned checkpoint is an ordinary lineside checkpoint (tensors and plain values only: it loads
with ``weights_only=True``) whose ``lineside.pruned`` record says the weights are smaller than the
config; every loader re-shapes the configured model to them (:mod:`lineside.fusion.pruning`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lineside.cli.common import (
    CHECKPOINT_HELP,
    add_model_arg,
    add_out_arg,
    add_trust_checkpoint_arg,
)

__all__ = ["build_parser", "main", "prune_checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside prune", description=(__doc__ or "").split("\n\n")[0])
    add_model_arg(ap, help=CHECKPOINT_HELP)
    add_out_arg(ap, help="the pruned checkpoint (.ckpt) to write")
    ap.add_argument("--ratio", type=float, required=True, help="share of each backbone layer's channels removed, in (0, 1); "
                    "0.5 keeps half the channels (about a quarter of the backbone's weights)")
    ap.add_argument("--round-to", type=int, default=8, help="kept channel counts are multiples of this")
    ap.add_argument("--image-size", type=int, default=None, help="side of the frame used to trace the graph (default: the training size)")
    add_trust_checkpoint_arg(ap)
    return ap


def prune_checkpoint(model: str | os.PathLike, out: str | os.PathLike, ratio: float, round_to: int = 8,
                     image_size: int | None = None, trust_checkpoint: bool = False) -> dict:
    """Prune ``model``'s backbone and write ``out``; returns the ``pruned`` record (ratio, parameter counts, source)."""
    import torch

    from lineside.export.checkpoint import CheckpointError, load_inspection_model
    from lineside.export.metadata import file_sha256
    from lineside.fusion.checkpoint_file import read_checkpoint
    from lineside.fusion.pruning import prune_backbone

    loaded = load_inspection_model(model, trust_checkpoint=trust_checkpoint)  # adapter fits come merged
    if loaded.config.get("class_path", "").endswith("InspectionEnsemble") or not hasattr(loaded.model, "image_encoder"):
        raise CheckpointError(f"{model}: pruning takes one model with an image encoder (not an ensemble)")
    ckpt = read_checkpoint(model, "cpu", trust_checkpoint)
    counts = prune_backbone(loaded.model, ratio, image_size or loaded.image_size, round_to)
    record = {"ratio": float(ratio), "round_to": int(round_to), "params_before": counts["before"], "params_after": counts["after"],
              "source": os.fspath(model), "source_sha256": file_sha256(model)}
    meta = {k: v for k, v in dict(ckpt["lineside"]).items() if k != "adapter"}
    hparams = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k not in ("adapter", "init_from")}
    pruned = {
        "state_dict": {f"model.{k}": v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()},
        "lineside": {**meta, "pruned": record},
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": ckpt.get("datamodule_hyper_parameters") or {},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(pruned, tmp)
    os.replace(tmp, out)
    return record


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not a.out.lower().endswith(".ckpt"):
        print(f"lineside prune: error: --out {a.out}: the pruned checkpoint must end in .ckpt", file=sys.stderr)
        return 2
    try:
        r = prune_checkpoint(a.model, a.out, a.ratio, a.round_to, a.image_size, a.trust_checkpoint)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"lineside prune: error: {exc}", file=sys.stderr)
        return 1
    print(f"{a.out}: {r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M parameters "
          f"({r['params_after'] / r['params_before']:.0%}), backbone channels pruned by {a.ratio:.0%}; "
          f"fine-tune with --model.init_from {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
