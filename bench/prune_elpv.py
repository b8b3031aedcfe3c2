"""Structured pruning of the backbone's channels on ELPV: parameters, ORT CPU latency, accuracy kept.

    python bench/prune_elpv.py --ckpt runs/quickstart/checkpoints/best.ckpt --ratios 0.3 0.5 \\
        --epochs 1 --limit-train-batches 30 --out runs/prune_elpv

For each ratio: ``lineside prune --ratio R`` (torch-pruning, L2 group importance, channels rounded
to multiples of 8), then a short fine-tune from the pruned weights with the base's config
(``--model.init_from pruned.ckpt``: ELPV *train* blocks, validation on the *val* blocks), then an
fp32 ONNX export. Every model (the base included) is measured on the ELPV *test* blocks
(``block_split(labels, 60, 0.1, 0.2, 0)["test"]``, never used for choices) in ONNX Runtime on the
CPU: accuracy, macro-F1, AUROC ok-vs-defective, and the median latency of ``--rounds`` calls at
batch 1 and 32, graphs interleaved call by call in one process on the same frames after warm-up.
"Kept" is the pruned model's figure as a share of the base's. Prints a markdown table and writes
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import yaml
from lineside.export.checkpoint import load_inspection_model
from lineside.export.deployable import build_deployable
from lineside.export.onnx_export import export_onnx
from lineside.fusion.ensemble import grade_metrics
from lineside.fusion.pruning import count_parameters
from lineside.runtime import OnnxRuntimeBackend
from lineside.runtime.verify import verify_artefact
from lineside.vision.elpv import elpv_records
from lineside.vision.io import read_image
from lineside.vision.preprocess import frames_to_batch
from lineside.vision.splits import block_split

from lineside.cli.prune import prune_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_cells(size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    records = elpv_records()
    idx = sorted(block_split([r.label for r in records], 60, 0.1, 0.2, 0)["test"])
    frames = [read_image(records[i].path, channels) for i in idx]
    return frames_to_batch(frames, (size, size)), np.array([records[i].label for i in idx])


def predict(backend, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([backend({"image": images[i:i + batch]})["grade_probs"] for i in range(0, len(images), batch)])


def latency(backends: dict, images: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    x = np.ascontiguousarray(images[:batch])
    for b in backends.values():
        for _ in range(3):
            b({"image": x})
    times: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(rounds):
        for k, b in backends.items():
            t0 = time.perf_counter()
            b({"image": x})
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fine_tune(config: str, pruned: Path, run: Path, epochs: int, batches: int) -> float:
    from lineside.fusion.training_cli import main as train_main

    cfg = yaml.safe_load(Path(config).read_text())
    cfg["trainer"].update(max_epochs=epochs, limit_train_batches=batches, default_root_dir=str(run), enable_progress_bar=False,
                          num_sanity_val_steps=0)
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    if cfg["model"].get("scheduler"):
        cfg["model"]["scheduler"]["init_args"]["T_max"] = epochs
    cfg["model"]["init_from"] = str(pruned)
    path = run / "bench_config.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    train_main(["fit", "--config", str(path), "--overwrite"])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/quickstart/checkpoints/best.ckpt")
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"), help="the base's training config")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit-train-batches", type=int, default=30, help="fine-tune batches; 0: no fine-tune")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="runs/prune_elpv")
    a = ap.parse_args()
    out = Path(a.out)
    base = load_inspection_model(a.ckpt)
    models = {"base": (Path(a.ckpt), count_parameters(base.model), None)}
    unrefined: dict = {}
    for ratio in a.ratios:
        run = out / f"ratio{ratio:g}"
        pruned = run / "pruned.ckpt"
        record = prune_checkpoint(a.ckpt, pruned, ratio)
        print(f"ratio {ratio}: {record['params_before'] / 1e6:.2f}M → {record['params_after'] / 1e6:.2f}M", flush=True)
        if a.limit_train_batches <= 0:  # no fine-tune: the pruned weights as they are
            models[f"pruned {ratio:g}, no fine-tune"] = (pruned, record["params_after"], None)
            continue
        wall = fine_tune(a.config, pruned, run, a.epochs, a.limit_train_batches)
        best = run / "checkpoints" / "best.ckpt"
        models[f"pruned {ratio:g}"] = (best, count_parameters(load_inspection_model(best).model), wall)
        unrefined[f"pruned {ratio:g}, no fine-tune"] = (pruned, record["params_after"])
    images, labels = test_cells(base.image_size, base.channels)
    backends, results = {}, {}
    for name, (ckpt, params) in unrefined.items():  # eager torch: accuracy only (not a deployment candidate)
        loaded = load_inspection_model(ckpt)
        deployable = build_deployable(loaded, None, 1).eval()
        with torch.no_grad():
            probs = np.concatenate([deployable.evaluate({"image": torch.from_numpy(images[i:i + 64])})["grade_probs"].numpy()
                                    for i in range(0, len(images), 64)])
        m = grade_metrics(probs, labels)
        results[name] = {"checkpoint": str(ckpt), "params": params, "onnx_mb": float("nan"), "fine_tune_s": None,
                         "accuracy": m["acc"], "macro_f1": m["macro_f1"], "auroc": m["auroc_defective"]}
        print(name, results[name], flush=True)
    for name, (ckpt, params, wall) in models.items():
        folder = out / "onnx" / name.replace(" ", "_").replace(",", "")
        r = export_onnx(ckpt, folder, tta_views=1, parity_images=8, verify=verify_artefact)
        if not r.ok:
            raise SystemExit(f"{ckpt}: ONNX parity failed\n{r.parity.table()}")
        backends[name] = OnnxRuntimeBackend(r.path)
        m = grade_metrics(predict(backends[name], images), labels)
        results[name] = {"checkpoint": str(ckpt), "params": params, "onnx_mb": r.path.stat().st_size / 1e6, "fine_tune_s": wall,
                         "accuracy": m["acc"], "macro_f1": m["macro_f1"], "auroc": m["auroc_defective"]}
        print(name, results[name], flush=True)
    timed = backends
    for batch in (1, 32):
        for name, t in latency(timed, images, batch, a.rounds).items():
            results[name][f"latency_b{batch}_ms"] = t * 1e3
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"test_cells": len(labels), "models": results}, indent=2))
    b = results["base"]
    print(f"\nELPV test blocks ({len(labels)} cells), ONNX Runtime CPU fp32")
    print("| model | params | ONNX MB | accuracy (kept) | macro-F1 (kept) | AUROC | latency b1 ms (speed-up) | latency b32 ms (speed-up) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        lat = (f"{r['latency_b1_ms']:.1f} ({b['latency_b1_ms'] / r['latency_b1_ms']:.2f}x) | "
               f"{r['latency_b32_ms']:.0f} ({b['latency_b32_ms'] / r['latency_b32_ms']:.2f}x)") if "latency_b1_ms" in r else "– | –"
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['onnx_mb']:.1f} | {r['accuracy']:.3f} ({r['accuracy'] / b['accuracy']:.0%}) | "
              f"{r['macro_f1']:.3f} ({r['macro_f1'] / b['macro_f1']:.0%}) | {r['auroc']:.3f} | {lat} |")


if __name__ == "__main__":
    main()
