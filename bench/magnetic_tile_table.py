"""Magnetic tile defect maps side by side: lineside's supervised dense decoder, lineside PatchMemory and
anomalib's peers, on the same test tiles, scored by the same lineside metric code.

    lineside fit --config configs/magnetic_tile_dense.yaml                  # the supervised map (masks)
    python bench/magnetic_tile_table.py --split-only                        # split + backbone file for the peer
    /work/peers/anomalib/bin/python bench/anomalib_magnetic_tile.py \\
        --split runs/magnetic_tile_bench/split.json --weights runs/magnetic_tile_bench/tf_efficientnet_lite0_imagenet.pth
    python bench/magnetic_tile_table.py --ckpt runs/magnetic_tile_dense/checkpoints/best.ckpt

Split: ``DetectionDataModule(dataset="magnetic_tile")`` as ``configs/magnetic_tile.yaml`` uses it
(whole tiles by ``tile_group``, stratified by class, 70 / 10 / 20 %, seed 0: 615 / 89 / 177
images). Good-only methods build their memory from the 441 ``Free`` tiles of the train split;
the supervised one trains on the train split's masks (all classes) and picks its checkpoint on
val. Nothing is chosen on test.

Per method, a file ``OUT/<method>.npz`` holds the test maps (``maps`` (N, h, w)), image scores,
fit seconds and seconds per image (peers write theirs from their own environment; lineside's are
made here and reused unless ``--refit``). Metrics, all on the 177 test images at each mask's own
resolution (every map resized bilinearly to it):

- image AUROC: defective vs ``Free`` tiles from each method's image score
  (:func:`lineside.vision.patch_memory_scoring.anomaly_auroc`);
- pixel AUROC and PRO (up to FPR 0.3): :class:`lineside.fusion.detection_metrics.PixelAUROC`
  (the metric ``lineside test`` reports). PRO's thresholds are 1,000 bins; probability maps use
  it as is (bins uniform in logit), distance maps are first mapped to ``sigmoid(24 (d - lo) /
  (hi - lo) - 12)`` with lo / hi the method's smallest / largest test value, so their bins are
  uniform in distance (as anomalib's PRO). Pixel AUROC does not depend on the mapping.

Prints one table (method, training data, image AUROC, pixel AUROC, PRO, fit time, per-image
time) and writes it to ``OUT/table.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def split_records(root: str | None, seed: int = 0) -> dict:
    from lineside.fusion.detection_datamodule import DetectionDataModule

    return DetectionDataModule(dataset="magnetic_tile", root=root, seed=seed).prepare_splits()


def write_split(splits: dict, out: Path) -> Path:
    """The peer's inputs: good training tiles, test images and their masks (paths only)."""
    train_good = [r.path for r in splits["train"] if r.image_class == "Free"]
    test = splits["test"]
    path = out / "split.json"
    path.write_text(json.dumps({
        "split": "magnetic tile, whole tiles (tile_group), stratified by class, 70/10/20 %, seed 0",
        "train_good": train_good,
        "test": [r.path for r in test],
        "test_masks": [r.mask_path for r in test],
        "test_class": [r.image_class for r in test],
    }, indent=1))
    return path


def write_backbone_weights(out: Path, backbone: str = "tf_efficientnet_lite0") -> Path:
    """lineside's offline ImageNet weights of ``backbone`` as a timm state dict file (for the peer's timm)."""
    from lineside.vision.pretrained import packaged_state_dict

    path = out / f"{backbone}_imagenet.pth"
    torch.save(packaged_state_dict(backbone), path)
    return path


def _save(path: Path, paths, maps, scores, fit_s, infer_s, train_data, method, note, probability) -> None:
    np.savez_compressed(path, paths=np.array(paths), maps=np.asarray(maps, dtype=np.float32), scores=np.asarray(scores, dtype=np.float64),
                        fit_s=fit_s, infer_s_per_image=infer_s, train_data=train_data, method=method, note=note, probability=probability)


def run_dense(ckpt: Path, splits: dict, out: Path, batch_size: int = 16, fit_s: float | None = None) -> Path:
    """Defect heatmaps (1 - p(background)) of a segmentation checkpoint on the test split; image score = its maximum."""
    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.deployable import build_deployable
    from lineside.vision.el_cracks import build_segmentation_eval_transform
    from lineside.vision.record_masks import RecordMaskDataset

    loaded = load_inspection_model(ckpt)
    if "segmentation" not in loaded.tasks:
        raise SystemExit(f"{ckpt}: not a segmentation checkpoint (tasks {loaded.tasks}); train configs/magnetic_tile_dense.yaml")
    dep = build_deployable(loaded)
    ds = RecordMaskDataset(splits["test"], [], build_segmentation_eval_transform(loaded.image_size), loaded.channels)
    maps, paths = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            items = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
            heat = dep.run(torch.stack([s["image"] for s in items]))["defect_heatmap"][:, 0]
            maps.append(heat.float().numpy())
            paths += [s["path"] for s in items]
    infer = (time.perf_counter() - t0) / len(ds)
    maps = np.concatenate(maps)
    if fit_s is None:  # the run folder's config.yaml is written when the fit starts, last.ckpt when it ends (a resumed fit: give --dense-fit-s)
        cfg, last = ckpt.parent.parent / "config.yaml", ckpt.parent / "last.ckpt"
        fit_s = (last.stat().st_mtime - cfg.stat().st_mtime) if cfg.is_file() and last.is_file() else float("nan")
    n_train = len(splits["train"])
    path = out / "lineside_dense.npz"
    _save(path, paths, maps, maps.reshape(len(maps), -1).max(1), fit_s, infer, f"masks of {n_train} train tiles (all classes)",
          "lineside dense decoder (supervised)", f"{ckpt}, {loaded.image_size} px, heatmap at stride 4", True)
    return path


def run_patch_memory(splits: dict, out: Path, image_size: int, stride: int, max_patches: int, batch_size: int = 16) -> Path:
    """``lineside patch-memory fit`` on the train split's good tiles (its defaults: 10 % kept out for the
    threshold), then the heatmaps and scores of the test images."""
    from lineside.vision.patch_memory_scoring import fit_memory, image_batches

    good = [r.path for r in splits["train"] if r.image_class == "Free"]
    t0 = time.perf_counter()
    fit = fit_memory(good, channels=1, batch_size=batch_size, image_size=image_size, stride=stride, max_patches=max_patches)
    fit_s = time.perf_counter() - t0
    fit.model.save(out / "patch_memory.pt")
    test = [r.path for r in splits["test"]]
    maps, scores, paths = [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, errors, p in image_batches(test, 1, image_size, batch_size):
            bad = [e for e in errors if e]
            if bad:
                raise SystemExit(f"unreadable test images: {bad}")
            r = fit.model(images)
            maps.append(r.heatmap.float().numpy())
            scores.append(r.score.float().numpy())
            paths += list(p)
    infer = (time.perf_counter() - t0) / len(test)
    path = out / "lineside_patch_memory.npz"
    _save(path, paths, np.concatenate(maps), np.concatenate(scores), fit_s, infer,
          f"{fit.n_memory} good train tiles (+{fit.n_calibration} for the threshold)", "lineside PatchMemory",
          f"tf_efficientnet_lite0 ImageNet, levels 2+3, {image_size} px, stride {stride}, {len(fit.model.memory)} random patches", False)
    return path


def to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Distances → (0, 1), monotone, logit linear in the distance over [lo, hi] (so PRO's logit bins are uniform in it)."""
    z = 24.0 * (values - lo) / max(hi - lo, 1e-12) - 12.0
    return 1.0 / (1.0 + np.exp(-z))


def score_method(npz: Path, splits: dict, seed: int = 0) -> dict:
    """Image AUROC, pixel AUROC and PRO of one method's test maps, with lineside's metric code."""
    from lineside.fusion.detection_metrics import PixelAUROC
    from lineside.vision.box_records import read_binary_mask
    from lineside.vision.patch_memory_scoring import anomaly_auroc

    d = np.load(npz, allow_pickle=False)
    records = {r.path: r for r in splits["test"]}
    paths = [str(p) for p in d["paths"]]
    if sorted(paths) != sorted(records):
        raise SystemExit(f"{npz}: its {len(paths)} images are not the {len(records)} test images of the split")
    maps, prob = d["maps"].astype(np.float32), bool(d["probability"])
    lo, hi = float(maps.min()), float(maps.max())
    metric = PixelAUROC(seed=seed)
    for path, m in zip(paths, maps):
        mask = torch.from_numpy(read_binary_mask(records[path].mask_path))
        heat = F.interpolate(torch.from_numpy(m)[None, None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0, 0]
        heat = heat.clamp(0, 1) if prob else torch.from_numpy(to_unit(heat.numpy(), lo, hi))
        metric.update(heat[None, None], mask[None])
    defective = np.array([records[p].image_class != "Free" for p in paths])
    return {
        "method": str(d["method"]), "train_data": str(d["train_data"]), "note": str(d["note"]),
        "image_auroc": anomaly_auroc(d["scores"].astype(np.float64), defective),
        "pixel_auroc": metric.compute(), "pro": metric.compute_pro(),
        "fit_s": float(d["fit_s"]), "ms_per_image": 1000.0 * float(d["infer_s_per_image"]), "n_test": len(paths),
    }


def _fmt_s(s: float) -> str:
    return "n/a" if not np.isfinite(s) else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s")


def table_md(rows: list[dict], notes: list[str]) -> str:
    lines = ["| method | trained on | image AUROC | pixel AUROC | PRO | fit (2 CPU cores, shared) | per image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['train_data']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pro']:.3f} | "
                     f"{_fmt_s(r['fit_s'])} | {r['ms_per_image']:.0f} ms |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="magnetic tile folder (default ../shared/data/magnetic_tile)")
    ap.add_argument("--out", default=str(REPO / "runs" / "magnetic_tile_bench"))
    ap.add_argument("--split-only", action="store_true", help="write split.json and the backbone weights for the peer, then stop")
    ap.add_argument("--ckpt", default=None, help="segmentation checkpoint (configs/magnetic_tile_dense.yaml) to score")
    ap.add_argument("--dense-fit-s", type=float, default=None, help="the checkpoint's fit wall seconds (default: from its run folder's file times)")
    ap.add_argument("--no-patch-memory", action="store_true")
    ap.add_argument("--pm-image-size", type=int, default=256)
    ap.add_argument("--pm-stride", type=int, default=8)
    ap.add_argument("--pm-max-patches", type=int, default=40000)
    ap.add_argument("--refit", action="store_true", help="recompute lineside's maps even where OUT has them")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = split_records(a.root)
    print(f"split: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
          f"good train tiles {sum(r.image_class == 'Free' for r in splits['train'])}", flush=True)
    if a.split_only:
        print(f"wrote {write_split(splits, out)} and {write_backbone_weights(out)}")
        return 0
    if a.ckpt and (a.refit or not (out / "lineside_dense.npz").is_file()):
        print(f"dense decoder → {run_dense(Path(a.ckpt), splits, out, fit_s=a.dense_fit_s)}", flush=True)
    if not a.no_patch_memory and (a.refit or not (out / "lineside_patch_memory.npz").is_file()):
        print(f"PatchMemory → {run_patch_memory(splits, out, a.pm_image_size, a.pm_stride, a.pm_max_patches)}", flush=True)
    order = ["lineside_dense.npz", "lineside_patch_memory.npz", "anomalib_patchcore.npz", "anomalib_efficient_ad.npz"]
    rows = [score_method(out / f, splits) for f in order if (out / f).is_file()]
    notes = [f"{r['method']}: {r['note']}" for r in rows]
    ead = out / "anomalib_efficient_ad.json"
    if ead.is_file() and not (out / "anomalib_efficient_ad.npz").is_file():
        s = json.loads(ead.read_text())
        notes.append(f"{s.get('method', 'EfficientAD')}: not run — " + "; ".join(f"{k}: {v}" for k, v in s.items() if k not in ("method", "ran")))
    md = table_md(rows, notes)
    print(md)
    (out / "table.md").write_text(md + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
