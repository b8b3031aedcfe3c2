"""LoRA adapters vs full fine-tuning on ELPV, one adapter per cell type on one base model.

    python bench/adapters_elpv.py --base runs/quickstart/checkpoints/best.ckpt --types poly mono \\
        --epochs 1 --limit-train-batches 24 --out runs/adapters_elpv

For each cell type (a "product": monocrystalline or polycrystalline cells), starting from the same
base checkpoint, with the base's config (configs/quickstart.yaml: its frozen levels, optimizer,
augmentation, image size), the same epochs and batches:

* **LoRA**: ``--model.adapter '{base: BASE, rank: R, alpha: 2R}'`` (attention q/k/v + output, feed-forward,
  backbone 1×1 convs, encoder projection; heads trained in full) → ``adapter.safetensors``;
* **full fine-tuning**: ``--model.init_from BASE``, every parameter the config trains.

Training data: that type's cells of the ELPV *train* blocks (``block_split(labels, 60, 0.1, 0.2, 0)``,
the split the base was trained on), validation on that type's *val* blocks; evaluation on that
type's cells of the *test* blocks (never used for choices), in eager torch fp32, of the base alone,
base + adapter (merged) and the fully fine-tuned model. Reported: share of parameters trained,
adapter file size, accuracy / macro-F1 / AUROC, LoRA's macro-F1 as a share of full fine-tuning's,
and the fit's wall and CPU time (LoRA / full). Prints a markdown table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import yaml
from lineside.export.checkpoint import instantiate_config, load_inspection_model
from lineside.export.deployable import build_deployable
from lineside.fusion.ensemble import grade_metrics
from lineside.vision.elpv import elpv_records
from lineside.vision.io import read_image
from lineside.vision.preprocess import frames_to_batch
from lineside.vision.splits import block_split

REPO = Path(__file__).resolve().parents[1]
TYPES = {"mono": "monocrystalline", "poly": "polycrystalline"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def write_manifests(out: Path, cell_type: str, class_names: list[str]) -> tuple[Path, list[int]]:
    """``out/<type>.csv`` (path,label,split,text: that type's cells of every block split) and the test indices."""
    records = elpv_records()
    splits = block_split([r.label for r in records], 60, 0.1, 0.2, 0)
    want = TYPES[cell_type]
    path = out / f"elpv_{cell_type}.csv"
    test = []
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "text"])
        for split, idx in splits.items():
            for i in sorted(idx):
                if records[i].text == want:
                    w.writerow([records[i].path, class_names[records[i].label], split, records[i].text])
                    if split == "test":
                        test.append(i)
    return path, test


def fit(config: dict, run: Path) -> dict:
    from lineside.fusion.training_cli import main as train_main

    run.mkdir(parents=True, exist_ok=True)
    path = run / "bench_config.yaml"
    path.write_text(yaml.safe_dump(config))
    w0, c0 = time.perf_counter(), cpu_seconds()
    train_main(["fit", "--config", str(path), "--overwrite"])
    return {"wall_s": time.perf_counter() - w0, "cpu_s": cpu_seconds() - c0}


def evaluate(loaded, idx: list[int], batch: int = 64) -> dict:
    records = elpv_records()
    deployable = build_deployable(loaded, None, 1).eval()
    probs = []
    for s in range(0, len(idx), batch):
        frames = [read_image(records[i].path, loaded.channels) for i in idx[s:s + batch]]
        images = torch.from_numpy(frames_to_batch(frames, (loaded.image_size, loaded.image_size)))
        with torch.no_grad():
            probs.append(deployable.evaluate({"image": images})["grade_probs"].numpy())
    m = grade_metrics(np.concatenate(probs), np.array([records[i].label for i in idx]))
    return {"accuracy": m["acc"], "macro_f1": m["macro_f1"], "auroc": m["auroc_defective"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/quickstart/checkpoints/best.ckpt")
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"), help="the base's training config")
    ap.add_argument("--types", nargs="+", default=["poly", "mono"], choices=list(TYPES))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit-train-batches", type=int, default=24)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--out", default="runs/adapters_elpv")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_inspection_model(a.base)
    results: dict = {"base": a.base, "epochs": a.epochs, "limit_train_batches": a.limit_train_batches, "rank": a.rank, "types": {}}
    trainable_full = sum(p.numel() for p in instantiate_config(base.config).parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.model.parameters())
    for cell_type in a.types:
        manifest, test = write_manifests(out, cell_type, base.class_names)
        row: dict = {"test_cells": len(test), "base": evaluate(base, test)}
        print(f"[{cell_type}] base on {len(test)} test cells: {row['base']}", flush=True)
        for mode in a.modes:
            cfg = yaml.safe_load(Path(a.config).read_text())
            run = out / f"{cell_type}_{mode}"
            cfg["trainer"].update(max_epochs=a.epochs, limit_train_batches=a.limit_train_batches, default_root_dir=str(run),
                                  enable_progress_bar=False, num_sanity_val_steps=0)
            cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
            cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
            if cfg["model"].get("scheduler"):
                cfg["model"]["scheduler"]["init_args"]["T_max"] = a.epochs
            cfg["data"].update(manifest=str(manifest), class_names=base.class_names, image_size=base.image_size)
            if mode == "lora":
                cfg["model"]["adapter"] = {"base": a.base, "rank": a.rank, "alpha": 2.0 * a.rank}
            else:
                cfg["model"]["init_from"] = a.base
            timing = fit(cfg, run)
            if mode == "lora":
                record = json.loads((run / "adapter.json").read_text())
                loaded = load_inspection_model(a.base, adapter=run / "adapter.safetensors")
                info = {"trained_params": record["trainable"], "file_kb": (run / "adapter.safetensors").stat().st_size / 1e3}
            else:
                loaded = load_inspection_model(run / "checkpoints" / "best.ckpt")
                info = {"trained_params": trainable_full, "file_kb": (run / "checkpoints" / "best.ckpt").stat().st_size / 1e3}
            row[mode] = {**evaluate(loaded, test), **timing, **info, "trained_share": info["trained_params"] / total}
            print(f"[{cell_type}] {mode}: {row[mode]}", flush=True)
        if "lora" in row and "full" in row:
            row["lora_vs_full"] = {"macro_f1": row["lora"]["macro_f1"] / max(row["full"]["macro_f1"], 1e-9),
                                   "accuracy": row["lora"]["accuracy"] / max(row["full"]["accuracy"], 1e-9),
                                   "wall": row["lora"]["wall_s"] / row["full"]["wall_s"], "cpu": row["lora"]["cpu_s"] / row["full"]["cpu_s"]}
        results["types"][cell_type] = row
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nbase {a.base}: {total / 1e6:.2f}M parameters; full fine-tuning trains {trainable_full / 1e6:.2f}M (the config's frozen levels stay frozen)")
    print("| cells | model | trained params | file | accuracy | macro-F1 | AUROC | fit wall s | fit CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell_type, row in results["types"].items():
        b = row["base"]
        print(f"| {cell_type} test ({row['test_cells']}) | base | – | – | {b['accuracy']:.3f} | {b['macro_f1']:.3f} | {b.get('auroc', float('nan')):.3f} | – | – |")
        for mode in a.modes:
            r = row[mode]
            print(f"| | {mode} | {r['trained_params'] / 1e3:.0f}k ({r['trained_share']:.1%}) | {r['file_kb']:.0f} KB | {r['accuracy']:.3f} | "
                  f"{r['macro_f1']:.3f} | {r.get('auroc', float('nan')):.3f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
        if "lora_vs_full" in row:
            v = row["lora_vs_full"]
            print(f"| | LoRA / full | | | {v['accuracy']:.0%} | {v['macro_f1']:.0%} | | {v['wall']:.2f} | {v['cpu']:.2f} |")


if __name__ == "__main__":
    main()
