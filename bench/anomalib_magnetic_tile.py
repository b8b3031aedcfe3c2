"""anomalib's PatchCore (and EfficientAD, where its weights are at hand) on lineside's magnetic tile split.

A peer, not a part of lineside: this script runs in a separate environment with anomalib 2.7
(it never imports lineside, and lineside never imports anomalib):

    python3 -m venv /work/peers/anomalib && /work/peers/anomalib/bin/pip install anomalib==2.7.0
    python bench/magnetic_tile_table.py --split-only                  # our venv: writes the split file
    /work/peers/anomalib/bin/python bench/anomalib_magnetic_tile.py \\
        --split runs/magnetic_tile_bench/split.json --weights runs/magnetic_tile_bench/tf_efficientnet_lite0_imagenet.pth
    python bench/magnetic_tile_table.py                               # our venv: one table, lineside's metrics

The split file lists the good training tiles (the memory) and the test images; the maps and
image scores go to ``<out-dir>/anomalib_<model>.npz`` (``paths``, ``maps`` (N, H, W) float32,
``scores`` (N,), ``fit_s``, ``infer_s_per_image``, ``train_data``, ``method``, ``note``, and
``probability`` False: the maps are distances, not probabilities). Metrics are computed by
``bench/magnetic_tile_table.py`` with lineside's own code, the same for every method.

No network: anomalib's default PatchCore backbone (``wide_resnet50_2``) and EfficientAD's
distilled teacher are downloads. PatchCore here runs on the ImageNet ``tf_efficientnet_lite0``
weights that lineside uses, given to timm as a local file (``--weights``, written by
``magnetic_tile_table.py --split-only``), at timm feature levels 2 and 3 (strides 8 and 16, as
``layer2`` / ``layer3`` of a ResNet). EfficientAD is tried; when its teacher weights or its
ImageNet penalty images cannot be had, the reason is written to ``anomalib_efficient_ad.json``.

What a 2-core CPU affords, and what differs from anomalib as shipped: the coreset keeps 1 % of
the patches (``--coreset 0.01``, the paper's PatchCore-1%; anomalib's default is 10 %), and
anomalib's greedy k-center pick is run with a cheaper distance update (one matrix-vector
product) in the features' own 152 dimensions, where anomalib's random projection would raise
them to 321; the pick is the same greedy rule. The training features are cached in the output
folder, so a second run skips that pass.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _load(paths: list[str], size: int) -> torch.Tensor:
    """Grey images → (B, 3, size, size) float in [0, 1] (grey repeated on three channels)."""
    out = []
    for p in paths:
        im = Image.open(p).convert("L").resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
        out.append(x.expand(3, -1, -1))
    return torch.stack(out)


def _batches(paths: list[str], batch_size: int):
    for i in range(0, len(paths), batch_size):
        yield paths[i : i + batch_size]


def _timm_local_weights(weights: str) -> None:
    """Make every ``timm.create_model(..., pretrained=True)`` load ``weights`` (no hub download)."""
    import timm

    import anomalib.models.components.feature_extractors.timm as fx

    create = timm.create_model

    def create_local(name, *args, pretrained=False, **kwargs):
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = dict(file=weights, num_classes=1000)
        return create(name, *args, pretrained=pretrained, **kwargs)

    fx.timm.create_model = create_local  # the module anomalib's TimmFeatureExtractor calls


def _fast_coreset_distances(minutes: float | None = None) -> None:
    """anomalib's greedy k-center coreset, its distance update as one matrix-vector product
    (``|f|^2 - 2 f.c + |c|^2``, the squared norms computed once): the same selection up to float
    rounding, a third of the memory traffic (the update streams every projected patch per pick).
    With ``minutes``, the pick stops after that long: the picks so far are the greedy coreset of
    that smaller size (greedy k-center picks do not depend on how many will follow)."""
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    def reset_distances(self) -> None:
        self.min_distances = None
        self._sq_norms = None

    def update_distances(self, cluster_center) -> None:
        if cluster_center is None:
            return
        if getattr(self, "_sq_norms", None) is None:
            self._sq_norms = (self.features * self.features).sum(1)
        c = self.features[cluster_center].reshape(-1)
        d = (self._sq_norms - 2.0 * (self.features @ c) + (c * c).sum()).clamp_min(0).sqrt().unsqueeze(1)
        self.min_distances = d if self.min_distances is None else torch.minimum(self.min_distances, d)

    select = KCenterGreedy.select_coreset_idxs

    def select_coreset_idxs(self) -> list[int]:
        # anomalib projects to the Johnson-Lindenstrauss dimension for eps 0.9 (321 for 451k
        # patches); where that is more than the features have (152 here), the projection only adds
        # work: pick in the feature space itself, which the projection approximates
        n, dim = self.embedding.shape
        if self.embedding.ndim != 2 or self.model._johnson_lindenstrauss_min_dim(n_samples=n, eps=self.model.eps) < dim:
            return select(self)
        self.features = self.embedding
        self.reset_distances()
        deadline = time.perf_counter() + 60.0 * minutes if minutes else None
        idx = torch.randint(high=self.n_observations, size=(1,), device=self.features.device).squeeze()
        picked = [idx]
        for i in range(self.coreset_size - 1):
            self.update_distances(cluster_center=idx)
            idx = self.get_new_idx()
            self.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
            picked.append(idx)
            if deadline is not None and time.perf_counter() > deadline:
                print(f"coreset stopped after {minutes:g} min at {len(picked)} of {self.coreset_size} picks", flush=True)
                break
            if (i + 2) % 250 == 0:
                print(f"coreset {i + 2}/{self.coreset_size}", flush=True)
        return torch.stack(picked).cpu().tolist()

    KCenterGreedy.reset_distances = reset_distances
    KCenterGreedy.update_distances = update_distances
    KCenterGreedy.select_coreset_idxs = select_coreset_idxs


def run_patchcore(split: dict, out_dir: Path, weights: str, backbone: str, layers: list[int], size: int, coreset: float,
                  batch_size: int, coreset_minutes: float | None = None) -> Path:
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    _timm_local_weights(weights)
    _fast_coreset_distances(coreset_minutes)
    model = PatchcoreModel(backbone=backbone, layers=layers, pre_trained=True, num_neighbors=9)
    pre = Patchcore.configure_pre_processor(image_size=(size, size))  # anomalib's own: resize + ImageNet normalisation
    transform = pre.transform
    cache = out_dir / f"patchcore_train_embeddings_{backbone}_{size}px_{'-'.join(map(str, layers))}.pt"
    t0 = time.perf_counter()
    model.train()
    if cache.is_file():  # the feature pass of an earlier run (same images, backbone, size, levels)
        cached = torch.load(cache, weights_only=True)
        model.embedding_store.append(cached["embedding"])
        t0 -= float(cached["seconds"])
    else:
        with torch.no_grad():
            for i, chunk in enumerate(_batches(split["train_good"], batch_size)):
                model(transform(_load(chunk, size)))
                print(f"memory batch {i + 1}/{-(-len(split['train_good']) // batch_size)}", flush=True)
        torch.save({"embedding": torch.cat(model.embedding_store), "seconds": time.perf_counter() - t0}, cache)
    n_patches = sum(len(e) for e in model.embedding_store)
    print(f"coreset {coreset:.1%} of {n_patches} patches (greedy k-center) ...", flush=True)
    model.subsample_embedding(coreset)
    fit_s = time.perf_counter() - t0
    model.eval()
    maps, scores = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in _batches(split["test"], batch_size):
            out = model(transform(_load(chunk, size)))
            maps.append(out.anomaly_map[:, 0].float().numpy())
            scores.append(out.pred_score.reshape(-1).float().numpy())
    infer = (time.perf_counter() - t0) / len(split["test"])
    path = out_dir / "anomalib_patchcore.npz"
    np.savez_compressed(
        path, paths=np.array(split["test"]), maps=np.concatenate(maps), scores=np.concatenate(scores), fit_s=fit_s,
        infer_s_per_image=infer, train_data=f"{len(split['train_good'])} good tiles", method="anomalib 2.7 PatchCore",
        probability=False,
        note=f"{backbone} ImageNet (lineside's weights, local file), timm levels {layers}, {size} px, greedy coreset "
             f"{len(model.memory_bank)} of {n_patches} patches ({len(model.memory_bank) / n_patches:.2%}), k=9",
    )
    print(f"PatchCore: fit {fit_s:.0f} s, {infer * 1000:.0f} ms per image → {path}", flush=True)
    return path


def try_efficient_ad(out_dir: Path, size: int) -> Path:
    """EfficientAD needs its distilled teacher (a download) and ImageNette penalty images (a
    download); record what happened instead of training a student against a random teacher."""
    from anomalib.models import EfficientAd

    status: dict = {"method": "anomalib 2.7 EfficientAD (small)"}
    model = EfficientAd(model_size="small")
    for step, call in (("teacher weights", model.prepare_pretrained_model),
                       ("ImageNette penalty images", lambda: model.prepare_imagenette_data((size, size)))):
        try:
            call()
            status[step] = "ok"
        except Exception as exc:  # noqa: BLE001 - report whatever the download failure is
            status[step] = f"{type(exc).__name__}: {exc}"[:400]
    status["ran"] = all(v == "ok" for k, v in status.items() if k != "method")
    path = out_dir / "anomalib_efficient_ad.json"
    path.write_text(json.dumps(status, indent=1))
    print(json.dumps(status, indent=1), flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, help="split JSON written by bench/magnetic_tile_table.py --split-only")
    ap.add_argument("--weights", required=True, help="timm state dict of the backbone (ImageNet), a local file")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3], help="timm feature levels (2, 3 = strides 8, 16)")
    ap.add_argument("--image-size", type=int, default=256, help="anomalib's PatchCore default: 256")
    ap.add_argument("--coreset", type=float, default=0.01,
                    help="coreset sampling ratio (anomalib's default 0.1; 0.01 = the paper's PatchCore-1%%, what a 2-core CPU affords)")
    ap.add_argument("--coreset-minutes", type=float, default=None,
                    help="stop the greedy pick after this long and keep the picks so far (a smaller exact greedy coreset)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["patchcore", "efficient_ad"], choices=["patchcore", "efficient_ad"])
    ap.add_argument("--out-dir", default=None, help="default: the split file's folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    split = json.loads(Path(a.split).read_text())
    out_dir = Path(a.out_dir) if a.out_dir else Path(a.split).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if "efficient_ad" in a.models:
        try_efficient_ad(out_dir, a.image_size)
    if "patchcore" in a.models:
        run_patchcore(split, out_dir, a.weights, a.backbone, a.layers, a.image_size, a.coreset, a.batch_size, a.coreset_minutes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
