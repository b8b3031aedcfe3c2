"""8-inch → 12-inch transfer on wafer maps with 200 labels: scratch vs fine-tuning vs fine-tuning + MMD.

    python bench/wafer_transfer.py                       # 3 seeds, the model of configs/wafer.yaml
    python bench/wafer_transfer.py --seeds 0 1 2 3 4 --labels 200 --steps 300 --mmd-weight 0.5

All maps are **generated** (:mod:`lineside.vision.wafer_synth`), not measured: the figures show
how the methods rank on the generator's 8-inch → 12-inch shift (larger die grids; edge, blob and
scratch sizes fixed in millimetres so they shrink relative to the wafer; a lower background loss),
not what they reach on a fab's maps.

Per seed (the seed draws every map set, the labelled sample and the initialisation):

- source: ``--source-maps`` labelled 8-inch maps; a model (``model.model`` of ``--config``) is
  trained on them for ``--pretrain-epochs``;
- target: ``--labels`` labelled 12-inch maps (a fifth ``none``, the rest spread evenly over the 8
  defect classes, as a fab picks examples to label), ``--unlabelled`` unlabelled 12-inch maps, and
  a held-out 12-inch test set (half ``none``, ``--test-per-class`` maps of each defect class).

Rows (each trains ``--steps`` steps of ``--batch`` labelled maps, AdamW, cosine schedule, rotations /
flips of the die grid):

1. *8-inch model, no fine-tuning*: the source model on the 12-inch test set;
2. *scratch*: random initialisation, the labelled 12-inch maps only;
3. *fine-tune*: from the 8-inch model, the labelled 12-inch maps only;
4. *fine-tune + 8-inch replay*: also cross-entropy on a batch of 8-inch maps each step (the
   control for row 5: the same data without the alignment term);
5. *fine-tune + MMD*: row 4 plus ``--mmd-weight`` · MMD² (:class:`lineside.fusion.domain_alignment.GaussianMMD`)
   between the pooled image-encoder features of the 8-inch batch and a batch of unlabelled 12-inch maps.

Rows 4–5 run the three batches through the model together (one batch-norm statistic for all).
The score is macro-F1 over the 8 defect classes (``none`` is most maps, so accuracy flatters),
mean ± standard deviation over seeds; CPU seconds are process time per run (both cores count).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lineside.export.checkpoint import instantiate_config
from lineside.fusion.domain_alignment import GaussianMMD
from lineside.vision.wafer_dataset import wafer_map_image
from lineside.vision.wafer_io import WM811K_CLASSES
from lineside.vision.wafer_synth import generate_wafer_maps

K = len(WM811K_CLASSES)
METHODS = {"scratch": "scratch (12-inch labels only)", "finetune": "fine-tune 8-inch model",
           "replay": "fine-tune + 8-inch replay", "mmd": "fine-tune + MMD (unlabelled 12-inch)"}
MIX = np.array([0.5] + [0.5 / (K - 1)] * (K - 1))  # half none, the defect classes evenly


def render(maps: list[np.ndarray], size: int, channels: int) -> torch.Tensor:
    """(N, C, S, S) uint8 model inputs, as :class:`lineside.vision.wafer_dataset.WaferMapDataset` makes them."""
    return torch.from_numpy(np.stack([wafer_map_image(m, size, channels).transpose(2, 0, 1) for m in maps]))


def d4(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random rotation / flip per image (the die grid has no preferred orientation)."""
    k = torch.randint(8, (len(x),), generator=g)
    out = x.clone()
    for t in range(8):
        sel = k == t
        if sel.any():
            y = torch.rot90(x[sel], t % 4, (-2, -1))
            out[sel] = y.flip(-1) if t >= 4 else y
    return out


def macro_f1_defects(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean F1 of classes 1..K-1 (every defect class; ``none`` excluded from the average, not from the predictions)."""
    f1 = []
    for c in range(1, K):
        tp = np.sum((pred == c) & (true == c))
        fp, fn = np.sum((pred == c) & (true != c)), np.sum((pred != c) & (true == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


class Pooled:
    """Captures the image encoder's tokens of the last forward, mean-pooled: (B, D)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = output.tokens.mean(1)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    model.eval()
    pred = torch.cat([model(image=x[i: i + 256]).grade_logits.argmax(-1) for i in range(0, len(x), 256)]).numpy()
    return macro_f1_defects(pred, y), float(np.mean(pred == y))


def class_weights(y: torch.Tensor) -> torch.Tensor:
    c = torch.bincount(y, minlength=K).float().clamp_min(1)
    w = c.rsqrt()
    return w * c.sum() / (w * c).sum()


def train(model, x_lab, y_lab, steps, lr, batch, seed, source=None, unlabelled=None, mmd_weight=0.0) -> float:
    """Train ``model`` in place; returns process CPU seconds. ``source`` = (x, y) adds 8-inch cross-entropy,
    ``unlabelled`` with ``mmd_weight`` > 0 the MMD between pooled 8-inch and unlabelled 12-inch features."""
    t0 = time.process_time()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    pooled = Pooled(model) if mmd_weight > 0 else None
    mmd = GaussianMMD()
    w_lab = class_weights(y_lab)
    w_src = class_weights(source[1]) if source is not None else None
    model.train()
    for _ in range(steps):
        i = torch.randint(len(x_lab), (batch,), generator=g)
        parts = [d4(x_lab[i], g)]
        if source is not None:
            j = torch.randint(len(source[0]), (batch,), generator=g)
            parts.append(d4(source[0][j], g))
        if pooled is not None:
            u = torch.randint(len(unlabelled), (batch,), generator=g)
            parts.append(d4(unlabelled[u], g))
        logits = model(image=torch.cat(parts)).grade_logits
        loss = F.cross_entropy(logits[:batch], y_lab[i], weight=w_lab)
        if source is not None:
            loss = loss + F.cross_entropy(logits[batch: 2 * batch], source[1][j], weight=w_src)
        if pooled is not None:
            feats = pooled.value
            loss = loss + mmd_weight * mmd(feats[batch: 2 * batch], feats[2 * batch:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.process_time() - t0


def stratified_labels(n: int) -> np.ndarray:
    """``n`` labels: a fifth ``none``, the rest over the defect classes as evenly as possible."""
    n_none = n // 5
    rest = n - n_none
    per = [rest // (K - 1) + (1 if c < rest % (K - 1) else 0) for c in range(K - 1)]
    return np.concatenate([np.zeros(n_none, int)] + [np.full(p, c + 1) for c, p in enumerate(per)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "wafer.yaml"), help="model.model of this config is trained")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labels", type=int, default=200, help="labelled 12-inch maps")
    ap.add_argument("--unlabelled", type=int, default=2000, help="unlabelled 12-inch maps (MMD)")
    ap.add_argument("--source-maps", type=int, default=3200, help="labelled 8-inch maps")
    ap.add_argument("--test-per-class", type=int, default=100, help="12-inch test maps per defect class (as many none as all defects)")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning / scratch steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="scratch and pre-training learning rate")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning learning rate")
    ap.add_argument("--mmd-weight", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=None, help="default: the config's data.image_size")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which rows 2-5 to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU seconds then count work, not the spinning of idle threads on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = yaml.safe_load(Path(args.config).read_text())
    model_cfg = cfg["model"]["model"]
    data = cfg["data"].get("init_args", cfg["data"])
    size, channels = args.image_size or int(data.get("image_size", 64)), int(data.get("channels", 1))

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return instantiate_config(model_cfg)

    rows: dict[str, list[tuple[float, float, float]]] = {}
    pre_cpu = []
    wall0 = time.perf_counter()
    for seed in args.seeds:
        base = 1000 * (seed + 1)
        src_maps, src_y = generate_wafer_maps(args.source_maps, "8inch", base + 1, MIX)
        lab_maps, lab_y = generate_wafer_maps(0, "12inch", base + 2, labels=stratified_labels(args.labels))
        unl_maps, _ = generate_wafer_maps(args.unlabelled, "12inch", base + 3, MIX)
        test_y = np.concatenate([np.zeros(args.test_per_class * (K - 1), int)] + [np.full(args.test_per_class, c) for c in range(1, K)])
        test_maps, test_y = generate_wafer_maps(0, "12inch", base + 4, labels=test_y)
        xs, ys = render(src_maps, size, channels), torch.as_tensor(src_y)
        xl, yl = render(lab_maps, size, channels), torch.as_tensor(lab_y)
        xu, xt = render(unl_maps, size, channels), render(test_maps, size, channels)

        source_model = build(seed)
        pre_steps = args.pretrain_epochs * len(xs) // args.batch
        pre_cpu.append(train(source_model, xs, ys, pre_steps, args.lr, args.batch, seed))
        rows.setdefault("8-inch model, no fine-tuning", []).append((*evaluate(source_model, xt, test_y), 0.0))
        state = {k: v.clone() for k, v in source_model.state_dict().items()}

        def from_source(seed: int = seed, state: dict = state) -> torch.nn.Module:
            m = build(seed)
            m.load_state_dict(state)
            return m

        replay = {"lr": args.ft_lr, "source": (xs, ys)}
        runs = {
            "scratch": (lambda seed=seed: build(seed + 100), {"lr": args.lr}),
            "finetune": (from_source, {"lr": args.ft_lr}),
            "replay": (from_source, replay),
            "mmd": (from_source, {**replay, "unlabelled": xu, "mmd_weight": args.mmd_weight}),
        }
        for key in args.methods:
            make, kw = runs[key]
            name = METHODS[key]
            m = make()
            cpu = train(m, xl, yl, args.steps, batch=args.batch, seed=seed, **kw)
            rows.setdefault(name, []).append((*evaluate(m, xt, test_y), cpu))
            f1, acc, _ = rows[name][-1]
            print(f"seed {seed}: {name}: macro-F1 {f1:.3f}, accuracy {acc:.3f}, {cpu:.0f} CPU s", flush=True)
        print(f"seed {seed}: 8-inch model: macro-F1 {rows['8-inch model, no fine-tuning'][-1][0]:.3f}; "
              f"pre-training {pre_cpu[-1]:.0f} CPU s", flush=True)

    def ms(v: list[float]) -> str:
        return f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.3f}"

    print()
    print(f"Generated maps; {args.labels} labelled 12-inch maps, {args.unlabelled} unlabelled, {args.source_maps} labelled 8-inch; "
          f"test: {args.test_per_class * 2 * (K - 1)} 12-inch maps (half none); seeds {args.seeds}; "
          f"model: model.model of {Path(args.config).name} at {size} px; {args.steps} steps of {args.batch}.")
    print()
    print("| method | macro-F1, 8 defect classes | accuracy, 9 classes | CPU s per run |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        f1, acc, cpu = zip(*vals)
        cpu_txt = f"{np.mean(pre_cpu):.0f} (pre-training)" if name.startswith("8-inch") else f"{np.mean(cpu):.0f}"
        print(f"| {name} | {ms(list(f1))} | {ms(list(acc))} | {cpu_txt} |")
    print()
    print(f"total: {time.process_time():.0f} CPU s, {time.perf_counter() - wall0:.0f} s wall, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
