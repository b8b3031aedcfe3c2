"""NEU-DET side by side: ultralytics YOLO11n (from ``yolo11n.yaml``) vs a lineside checkpoint, same split, same metric.

    PYTHONPATH=/tmp/ultra python bench/yolo_neu_det.py [--minutes 12] [--imgsz 192] \\
        [--lineside-ckpt runs/neu_det/checkpoints/best.ckpt] [--out runs/yolo_neu_det]

ultralytics is *not* a lineside dependency and never will be: install it beside the venv, e.g.
``.venv/bin/pip install --target /tmp/ultra --no-deps ultralytics matplotlib contourpy cycler
fonttools kiwisolver pyparsing python-dateutil six polars polars-runtime-32 ultralytics-thop``
(the venv's torch, torchvision, numpy, opencv, pillow, pyyaml, requests, psutil serve it), and
put that folder on ``PYTHONPATH``. It is imported only inside :func:`train_yolo`.

What it does:

1. Splits NEU-DET exactly as ``lineside fit --config configs/neu_det.yaml`` does
   (``DetectionDataModule(dataset="neu_det").prepare_splits()``: stratified by file-prefix
   class, 70/10/20 %, seed 0 → 840/120/240 images) and writes it as a YOLO dataset under
   ``OUT/dataset`` (``images/<split>/`` symlinks to ``../shared/data/neu_det/IMAGES``,
   ``labels/<split>/*.txt`` with ``class cx cy w h`` normalised, ``data.yaml``).
2. Trains YOLO11n from ``yolo11n.yaml`` (random init, no hub weights) on CPU for the same
   wall-clock budget as lineside's fit (ultralytics' ``time=`` argument: it sizes the epoch
   count after the first epoch, validation on the val split included, and keeps ``best.pt`` by
   val fitness as lineside keeps ``best.ckpt`` by val mAP@0.5). Offline: ``YOLO_OFFLINE=1``,
   no auto-install, no plots (no font download), ``amp=False`` (no AMP check download); its
   settings live in ``OUT/ultralytics_config``, not in the user's home.
3. Evaluates ``best.pt`` on the test split with lineside's own :class:`BoxMeanAP` (torchmetrics
   COCO mAP; predictions at ``conf=0.001``, NMS IoU 0.7, at most 100 per image, boxes in image
   pixels against the records' boxes), and prints ultralytics' own ``val(split="test")``
   mAP for reference.
4. With ``--lineside-ckpt``, evaluates that checkpoint on the same test split with the same
   :class:`BoxMeanAP` the way ``lineside test`` does (eval resize, top-K ``BoxDecoder``).

Prints one table: tool, input size, train minutes, epochs, test mAP@0.5, mAP@0.5:0.95 and
per-class AP@0.5; writes it as ``OUT/results.json`` too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from lineside.fusion.detection_datamodule import DetectionDataModule  # noqa: E402
from lineside.fusion.detection_metrics import BoxMeanAP  # noqa: E402
from lineside.vision.box_records import DetectionRecord  # noqa: E402

MAX_DETECTIONS = 100


def write_yolo_dataset(splits: dict[str, list[DetectionRecord]], class_names: list[str], folder: Path) -> Path:
    """Write ``splits`` as a YOLO dataset (image symlinks + label txt) under ``folder``; return its ``data.yaml``."""
    folder = folder.resolve()
    for split, records in splits.items():
        images, labels = folder / "images" / split, folder / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for r in records:
            src = Path(r.path).resolve()
            if src.name in seen:
                raise ValueError(f"{src}: two images named {src.name!r} in the {split} split; YOLO needs unique names")
            seen.add(src.name)
            link = images / src.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src)
            lines = []
            for (x1, y1, x2, y2), c in zip(r.boxes.tolist(), r.labels.tolist()):
                cx, cy = (x1 + x2) / 2 / r.width, (y1 + y2) / 2 / r.height
                w, h = (x2 - x1) / r.width, (y2 - y1) / r.height
                lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (labels / f"{src.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        for stale in labels.parent.glob(f"{split}.cache"):
            stale.unlink()  # ultralytics' label cache from an earlier split
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({
        "path": str(folder),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(class_names)),
    }, sort_keys=False))
    return data_yaml


def _targets(records: list[DetectionRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (N, M, 4) boxes, (N, M) labels and box mask of ``records`` in image pixels."""
    m = max(1, max(r.num_boxes for r in records))
    boxes = torch.zeros(len(records), m, 4)
    labels = torch.full((len(records), m), -1, dtype=torch.int64)
    mask = torch.zeros(len(records), m, dtype=torch.bool)
    for i, r in enumerate(records):
        k = r.num_boxes
        boxes[i, :k] = torch.as_tensor(r.boxes, dtype=torch.float32)
        labels[i, :k] = torch.as_tensor(r.labels, dtype=torch.int64)
        mask[i, :k] = True
    return boxes, labels, mask


def _pad(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-image (k, 4) boxes, (k,) scores, (k,) labels to (N, K, ·) with score -1 / label -1 (never kept)."""
    k = max(1, max(len(s) for _, s, _ in rows))
    boxes = torch.zeros(len(rows), k, 4)
    scores = torch.full((len(rows), k), -1.0)
    labels = torch.full((len(rows), k), -1, dtype=torch.int64)
    for i, (b, s, c) in enumerate(rows):
        boxes[i, : len(s)], scores[i, : len(s)], labels[i, : len(s)] = b, s, c
    return boxes, scores, labels


def _ultralytics_env(out: Path) -> None:
    """Offline, no auto-install, settings under ``out`` (set before ultralytics is imported)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "ultralytics_config"))


def train_yolo(data_yaml: Path, out: Path, minutes: float, imgsz: int, batch: int, workers: int, seed: int,
               threads: int | None = None) -> dict:
    """Train YOLO11n from ``yolo11n.yaml`` for ``minutes`` of wall time on CPU; return its run facts.

    ``threads``: torch CPU threads for YOLO; ``None`` keeps ultralytics' default (CPUs - 1, at
    most 8: one thread on a 2-core machine; its ``select_device`` resets torch to that).
    """
    _ultralytics_env(out)
    try:
        from ultralytics import YOLO, settings
        from ultralytics.utils import torch_utils
    except ImportError as exc:
        raise SystemExit(f"ultralytics is not importable ({exc}); install it outside the venv and put it on PYTHONPATH "
                         "(see this script's docstring)") from None
    settings.update({"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False, "datasets_dir": str(out)})
    if threads:
        torch_utils.NUM_THREADS = threads
    model = YOLO("yolo11n.yaml")
    t0 = time.perf_counter()
    model.train(
        data=str(data_yaml), epochs=1000, time=minutes / 60, imgsz=imgsz, batch=batch, device="cpu",
        workers=workers, amp=False, plots=False, pretrained=False, seed=seed, project=str(out),
        name=f"yolo11n_{imgsz}", exist_ok=True, verbose=False,
    )
    train_s = time.perf_counter() - t0
    run = Path(model.trainer.save_dir)
    with open(run / "results.csv", newline="") as f:
        epochs = sum(1 for _ in csv.DictReader(f))
    best = Path(model.trainer.best)
    if not best.is_file():
        best = Path(model.trainer.last)
    return {"YOLO": YOLO, "best": best, "train_minutes": train_s / 60, "epochs": epochs, "run": run,
            "threads": torch.get_num_threads()}


@torch.no_grad()
def eval_yolo(YOLO, weights: Path, data_yaml: Path, records: list[DetectionRecord], class_names: list[str],
              imgsz: int, batch: int) -> dict:
    """lineside's BoxMeanAP of ``weights`` on ``records`` (plus ultralytics' own test-split val mAP)."""
    model = YOLO(str(weights))
    metric = BoxMeanAP(class_names, max_detections=MAX_DETECTIONS)
    t0 = time.perf_counter()
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        results = model.predict([r.path for r in chunk], imgsz=imgsz, conf=0.001, iou=0.7, max_det=MAX_DETECTIONS,
                                device="cpu", verbose=False, batch=batch)
        rows = [(res.boxes.xyxy.float().cpu(), res.boxes.conf.float().cpu(), res.boxes.cls.long().cpu()) for res in results]
        metric.update(*_pad(rows), *_targets(chunk))
    out = metric.compute()
    out["predict_s_per_image"] = (time.perf_counter() - t0) / len(records)
    v = model.val(data=str(data_yaml), split="test", imgsz=imgsz, batch=batch, device="cpu", plots=False,
                  verbose=False, save_json=False, project=str(weights.parents[2]), name="test_val", exist_ok=True)
    out["ultralytics_map_50"], out["ultralytics_map"] = float(v.box.map50), float(v.box.map)
    return out


@torch.no_grad()
def eval_lineside(ckpt: Path, root: str | None, class_names: list[str], batch: int, seed: int = 0,
                  limit: int | None = None) -> dict:
    """lineside's BoxMeanAP of a localization checkpoint on the NEU-DET test split, as ``lineside test`` computes it."""
    from lineside.export.checkpoint import load_inspection_model
    from lineside.fusion.box_decoder import BoxDecoder

    loaded = load_inspection_model(ckpt)
    model = loaded.model
    if getattr(model, "localization_head", None) is None:
        raise SystemExit(f"{ckpt}: the model has no localization head")
    names = loaded.box_class_names or class_names
    if names != class_names:
        raise SystemExit(f"{ckpt}: box classes {names} differ from NEU-DET's {class_names}")
    dm = DetectionDataModule(dataset="neu_det", root=root, image_size=loaded.image_size, channels=loaded.channels,
                             batch_size=batch, num_workers=0, seed=seed, limit=limit)
    stride = float(model.image_encoder.strides[model.localization_head.level_index])
    size = loaded.image_size
    side = -(-size // int(stride))  # heatmap cells per side (ceil)
    cells = model.localization_head.num_classes * side * side
    decoder = BoxDecoder(stride, (size, size), top_k=min(MAX_DETECTIONS, cells))
    metric = BoxMeanAP(names, max_detections=MAX_DETECTIONS)
    n, t0 = 0, time.perf_counter()
    for b in dm.test_dataloader():
        boxes, scores, labels, _ = decoder(model(b["image"]).localization)
        metric.update(boxes, scores, labels, b["boxes"], b["labels"], b["box_mask"])
        n += len(b["image"])
    out = metric.compute()
    out["predict_s_per_image"] = (time.perf_counter() - t0) / n
    out["best_epoch"] = int(torch.load(ckpt, map_location="cpu", weights_only=False).get("epoch", -1)) + 1
    out["image_size"] = size
    out["threads"] = torch.get_num_threads()
    return out


def table(rows: list[dict], class_names: list[str]) -> str:
    head = ["tool", "input px", "torch threads", "train min", "epochs", "test mAP@0.5", "mAP@0.5:0.95", *[f"AP50 {c}" for c in class_names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        minutes = f"{r['train_minutes']:.1f}" if r.get("train_minutes") is not None else "?"
        cells = [r["tool"], str(r["imgsz"]), str(r.get("threads", "?")), minutes, str(r["epochs"]), f"{r['map_50']:.3f}", f"{r['map']:.3f}",
                 *[f"{r.get(f'ap_50/{c}', float('nan')):.2f}" for c in class_names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="YOLO wall-clock training budget (lineside's NEU-DET fit: 12)")
    p.add_argument("--imgsz", type=int, default=192, help="YOLO input side (lineside's NEU-DET config: 192)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for YOLO (default: ultralytics' CPUs - 1)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="split seed (lineside's default 0) and YOLO's seed")
    p.add_argument("--root", default=None, help="NEU-DET folder (default ../shared/data/neu_det beside the repository)")
    p.add_argument("--out", default="runs/yolo_neu_det", help="dataset, YOLO runs and results.json go here")
    p.add_argument("--lineside-ckpt", default=None, help="also evaluate this lineside NEU-DET checkpoint")
    p.add_argument("--limit", type=int, default=None, help="keep at most this many images per split (smoke runs)")
    p.add_argument("--lineside-minutes", type=float, default=None, help="that checkpoint's fit wall time, for the table")
    p.add_argument("--lineside-epochs", type=int, default=None, help="that checkpoint's fit epochs, for the table")
    a = p.parse_args(argv)

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dm = DetectionDataModule(dataset="neu_det", root=a.root, seed=a.seed, limit=a.limit)
    splits = dm.prepare_splits()
    names = dm.class_names
    print(f"NEU-DET {dm.source}: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()), flush=True)
    data_yaml = write_yolo_dataset(splits, names, out / "dataset")
    print(f"YOLO dataset: {data_yaml}", flush=True)

    rows = []
    if a.lineside_ckpt:
        ls = eval_lineside(Path(a.lineside_ckpt), a.root, names, a.batch, a.seed, a.limit)
        epochs = f"{a.lineside_epochs or '?'} (best {ls['best_epoch']})"
        rows.append({"tool": "lineside (CenterNet head)", "imgsz": ls["image_size"], "train_minutes": a.lineside_minutes,
                     "epochs": epochs, **ls})
        print(f"lineside {a.lineside_ckpt}: map_50 {ls['map_50']:.3f} map {ls['map']:.3f}", flush=True)

    y = train_yolo(data_yaml, out, a.minutes, a.imgsz, a.batch, a.workers, a.seed, a.threads)
    print(f"YOLO11n: {y['epochs']} epochs in {y['train_minutes']:.1f} min, best {y['best']}", flush=True)
    ym = eval_yolo(y["YOLO"], y["best"], data_yaml, splits["test"], names, a.imgsz, a.batch)
    rows.append({"tool": "ultralytics YOLO11n (yolo11n.yaml)", "imgsz": a.imgsz, "train_minutes": y["train_minutes"],
                 "epochs": y["epochs"], "threads": y["threads"], **ym})

    print(f"\nNEU-DET test split ({len(splits['test'])} images), lineside BoxMeanAP (torchmetrics COCO mAP); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(table(rows, names))
    print(f"ultralytics' own val on the test split: mAP@0.5 {ym['ultralytics_map_50']:.3f}, "
          f"mAP@0.5:0.95 {ym['ultralytics_map']:.3f}")
    for r in rows:
        print(f"{r['tool']}: inference {1000 * r['predict_s_per_image']:.1f} ms/image (CPU, batch {a.batch})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "class_names": names, "args": vars(a)}, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
