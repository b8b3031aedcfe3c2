"""Few-label transfer on real EL cells: an ELPV model trained on monocrystalline cells, adapted to
polycrystalline cells with 200 labelled poly cells. Fine-tuning vs + MMD vs + MMD + contrastive.

    nice -n 10 python bench/mono_poly_transfer.py                       # 3 seeds
    nice -n 10 python bench/mono_poly_transfer.py --seeds 0 --steps 60 --pretrain-steps 120

Data (ELPV from the ``elpv-dataset`` package, the module-block split every ELPV figure uses:
``block_split(labels, 60, 0.1, 0.2, seed=0)``; each cell's type from the package's ``type`` column):

* source: the **mono** cells of the train blocks (labelled);
* target, labelled: ``--labels`` **poly** cells of the train blocks, drawn per grade in proportion
  (:func:`lineside.fusion.transfer_datamodule.pick_labelled`, seeded by the run's seed);
* target, unlabelled: the other poly cells of the train blocks (their labels are never read);
* evaluation: the poly cells of the **test** blocks (held-out modules). The val blocks are not used
  (nothing is tuned here; every setting is fixed before the run).

The source model (``model.model`` of ``--config``, ImageNet-initialised backbone) is trained on the
mono cells for ``--pretrain-steps`` per seed. Rows, each ``--steps`` AdamW steps of ``--batch``
labelled poly cells from the mono model (augmentation: dihedral flips/rotations and exposure):

0. *mono model, zero-shot*: no poly labels (the floor);
1. *fine-tune*: the labelled poly cells only;
2. *fine-tune + mono replay*: also the grading loss on a batch of mono cells (the control for 3-4);
3. *+ MMD*: row 2 plus ``--mmd-weight`` · MMD² (:class:`lineside.fusion.domain_alignment.GaussianMMD`,
   the wafer transfer's) between pooled image-encoder features of the mono batch and a batch of
   unlabelled poly cells;
4. *+ MMD + contrastive*: row 3 plus ``--contrastive-weight`` · InfoNCE (SimCLR's NT-Xent,
   :func:`lineside.fusion.transfer.info_nce`, temperature ``--temperature``, a 2-layer projection head)
   between two augmented views (random crop 60-100 % + flips + exposure) of the unlabelled poly cells.

Rows 2-4 put all their batches through the model together (one batch-norm statistic). Metrics on
the poly test cells (:func:`lineside.fusion.ensemble.grade_metrics`): accuracy, macro-F1 over the 4
grades, AUROC ok-vs-defective; mean ± std over seeds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lineside.export.checkpoint import instantiate_config
from lineside.fusion.ensemble import grade_metrics
from lineside.fusion.transfer import DomainTransferCriterion, FeatureTap
from lineside.fusion.transfer_datamodule import pick_labelled
from lineside.vision.elpv import elpv_records
from lineside.vision.io import read_image
from lineside.vision.preprocess import frames_to_batch
from lineside.vision.splits import block_split

METHODS = {
    "finetune": "fine-tune (200 poly labels)",
    "replay": "fine-tune + mono replay",
    "mmd": "fine-tune + mono replay + MMD (unlabelled poly)",
    "contrast": "fine-tune + mono replay + MMD + contrastive",
}
ZERO_SHOT = "mono model, zero-shot (floor)"
K = 4


def load_cells(size: int, channels: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """uint8 (N, C, S, S) frames and grades of the mono train cells, poly train cells and poly test cells."""
    records = elpv_records()
    split = block_split([r.label for r in records], 60, 0.1, 0.2, 0)
    out = {}
    for name, part, kind in (("mono_train", "train", "monocrystalline"), ("poly_train", "train", "polycrystalline"),
                             ("poly_test", "test", "polycrystalline")):
        idx = [i for i in sorted(split[part]) if records[i].text == kind]
        frames = [read_image(records[i].path, channels) for i in idx]
        out[name] = (torch.from_numpy(frames_to_batch(frames, (size, size))), np.array([records[i].label for i in idx]))
    return out


def d4_exposure(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip/rotation of the cell and an exposure change (gain 0.8-1.2, offset ±15 grey levels), uint8 → uint8."""
    k = torch.randint(8, (len(x),), generator=g)
    out = x.clone()
    for t in range(8):
        sel = k == t
        if sel.any():
            y = torch.rot90(x[sel], t % 4, (-2, -1))
            out[sel] = y.flip(-1) if t >= 4 else y
    gain = 0.8 + 0.4 * torch.rand(len(x), 1, 1, 1, generator=g)
    offset = 30.0 * torch.rand(len(x), 1, 1, 1, generator=g) - 15.0
    return (out.float() * gain + offset).clamp(0, 255).round().to(torch.uint8)


def crop_view(x: torch.Tensor, g: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """A contrastive view: a random square crop of 60-100 % of the side, resized back, then :func:`d4_exposure`."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        s = float(min_scale + (1 - min_scale) * torch.rand(1, generator=g))
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y0 = int(torch.randint(h - ch + 1, (1,), generator=g))
        x0 = int(torch.randint(w - cw + 1, (1,), generator=g))
        crop = x[i: i + 1, :, y0: y0 + ch, x0: x0 + cw].float()
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
    return d4_exposure(out, g)


def class_weights(y: torch.Tensor) -> torch.Tensor:
    """Inverse-square-root class frequencies, normalised to a mean weight of 1 per sample."""
    c = torch.bincount(y, minlength=K).float().clamp_min(1)
    w = c.rsqrt()
    return w * c.sum() / (w * c).sum()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> dict:
    model.eval()
    logits = torch.cat([model(image=x[i: i + 128]).grade_logits for i in range(0, len(x), 128)])
    return grade_metrics(torch.softmax(logits.float(), -1).numpy(), y)


def train(model, lab, steps: int, lr: float, batch: int, seed: int, source=None, unlabelled=None,
          criterion: DomainTransferCriterion | None = None, desc: str = "") -> float:
    """Train ``model`` in place (AdamW, cosine schedule); returns wall seconds. ``source`` = (x, y): replay;
    ``unlabelled`` x with ``criterion``: its MMD / contrastive terms on pooled encoder features."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) + (list(criterion.parameters()) if criterion is not None else [])
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    xl, yl = lab
    w_lab = class_weights(yl)
    w_src = class_weights(source[1]) if source is not None else None
    use_unl = unlabelled is not None and criterion is not None and criterion.active
    two_views = use_unl and criterion.weight_dict["loss_contrast"] > 0
    tap = FeatureTap(model.image_encoder)
    model.train()
    try:
        for step in range(steps):
            i = torch.randint(len(xl), (batch,), generator=g)
            parts = [d4_exposure(xl[i], g)]
            if source is not None:
                j = torch.randint(len(source[0]), (batch,), generator=g)
                parts.append(d4_exposure(source[0][j], g))
            if use_unl:
                u = unlabelled[torch.randint(len(unlabelled), (batch,), generator=g)]
                parts.append(crop_view(u, g) if two_views else d4_exposure(u, g))
                if two_views:
                    parts.append(crop_view(u, g))
            logits = model(image=torch.cat(parts)).grade_logits
            loss = F.cross_entropy(logits[:batch], yl[i], weight=w_lab)
            if source is not None:
                loss = loss + F.cross_entropy(logits[batch: 2 * batch], source[1][j], weight=w_src)
            if use_unl:
                feats = tap.value
                s0 = 2 * batch if source is not None else batch
                terms = criterion(feats[batch: 2 * batch] if source is not None else None, feats[s0: s0 + batch],
                                  feats[s0 + batch: s0 + 2 * batch] if two_views else None)
                loss = loss + sum(criterion.weight_dict[k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if desc and (step + 1) % max(1, steps // 4) == 0:
                print(f"  {desc}: step {step + 1}/{steps}, loss {float(loss.detach()):.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        tap.remove()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "elpv_mono_poly.yaml"), help="model.model of this config is trained")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labels", type=int, default=200, help="labelled poly cells")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=150, help="mono source-model steps")
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per row")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3, help="source pre-training learning rate")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    ap.add_argument("--mmd-weight", type=float, default=1.0)
    ap.add_argument("--contrastive-weight", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = yaml.safe_load(Path(args.config).read_text())
    model_cfg = cfg["model"]["model"]
    embed = int(model_cfg["init_args"]["image_encoder"]["init_args"].get("embed_dim", 192))
    channels = int(model_cfg["init_args"]["image_encoder"]["init_args"].get("in_chans", 1))
    wall0 = time.perf_counter()
    cells = load_cells(args.image_size, channels)
    xs, ys = cells["mono_train"][0], torch.as_tensor(cells["mono_train"][1])
    xp, yp = cells["poly_train"]
    xt, yt = cells["poly_test"]
    print(f"cells: mono train {len(xs)}, poly train {len(xp)} (labelled {args.labels}), poly test {len(xt)} "
          f"(grades {np.bincount(yt, minlength=K).tolist()}); load {time.perf_counter() - wall0:.0f} s", flush=True)

    def build(seed: int, pretrained: bool) -> torch.nn.Module:
        torch.manual_seed(seed)
        return instantiate_config(model_cfg, offline_weights=not pretrained)

    rows: dict[str, list[dict]] = {}
    secs: dict[str, list[float]] = {}
    for seed in args.seeds:
        source_model = build(seed, pretrained=True)
        secs.setdefault("pretrain", []).append(train(source_model, (xs, ys), args.pretrain_steps, args.lr, args.batch, seed,
                                                     desc=f"seed {seed} mono pre-training"))
        rows.setdefault(ZERO_SHOT, []).append(evaluate(source_model, xt, yt))
        state = {k: v.clone() for k, v in source_model.state_dict().items()}
        pick = pick_labelled(yp.tolist(), args.labels, seed)
        rest = np.setdiff1d(np.arange(len(xp)), pick)
        lab = (xp[pick], torch.as_tensor(yp[pick]))
        unl = xp[rest]
        m = rows[ZERO_SHOT][-1]
        print(f"seed {seed}: {ZERO_SHOT}: acc {m['acc']:.3f}, macro-F1 {m['macro_f1']:.3f}, AUROC {m['auroc_defective']:.3f}", flush=True)
        for key in args.methods:
            model = build(seed, pretrained=False)
            model.load_state_dict(state)
            kw: dict = {}
            if key in ("replay", "mmd", "contrast"):
                kw["source"] = (xs, ys)
            if key in ("mmd", "contrast"):
                torch.manual_seed(seed)
                kw["criterion"] = DomainTransferCriterion(embed, args.mmd_weight, args.contrastive_weight if key == "contrast" else 0.0,
                                                          args.temperature)
                kw["unlabelled"] = unl
            secs.setdefault(key, []).append(train(model, lab, args.steps, args.ft_lr, args.batch, seed + 1, desc=f"seed {seed} {key}", **kw))
            rows.setdefault(METHODS[key], []).append(evaluate(model, xt, yt))
            m = rows[METHODS[key]][-1]
            print(f"seed {seed}: {METHODS[key]}: acc {m['acc']:.3f}, macro-F1 {m['macro_f1']:.3f}, AUROC {m['auroc_defective']:.3f}, "
                  f"{secs[key][-1]:.0f} s", flush=True)

    def ms(vals: list[float]) -> str:
        v = 100 * np.asarray(vals)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"

    print()
    print(f"ELPV mono → poly, {args.labels} labelled poly cells; test: {len(xt)} poly cells of the test blocks; seeds {args.seeds}; "
          f"model: model.model of {Path(args.config).name} at {args.image_size} px; mono pre-training {args.pretrain_steps} steps, "
          f"fine-tuning {args.steps} steps of {args.batch}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print()
    print("| method | accuracy % | macro-F1 % | AUROC ok-vs-defective % | wall s per run |")
    print("|---|---|---|---|---|")
    for name, vals in rows.items():
        key = next((k for k, v in METHODS.items() if v == name), "pretrain")
        t = f"{np.mean(secs[key]):.0f}" + (" (pre-training)" if key == "pretrain" else "")
        print(f"| {name} | {ms([v['acc'] for v in vals])} | {ms([v['macro_f1'] for v in vals])} | "
              f"{ms([v['auroc_defective'] for v in vals])} | {t} |")
    print()
    print(f"total {time.perf_counter() - wall0:.0f} s wall")


if __name__ == "__main__":
    main()
