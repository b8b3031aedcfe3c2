"""Continual learning on NEU-DET: plain fine-tuning vs EWC vs replay vs EWC + replay, in one run.

Step 1 trains on crazing, inclusion, patches (configs/neu_det_step1.yaml) and writes the EWC Fisher;
step 2 grows the head to 6 classes and learns pitted_surface, rolled-in_scale, scratches
(configs/neu_det_step2.yaml) four ways. Every model is tested with ``lineside test`` on the same
240 test images (the module's seeded 20 % split); old-class mAP@0.5 = mean AP@0.5 of the 3 step-1
classes, new-class mAP@0.5 = that of the 3 step-2 classes. Each fit is bounded by ``--max-time``.

    python bench/continual_neu_det.py                       # → runs/continual_neu_det/{step1,plain,ewc,replay,ewc_replay}
    python bench/continual_neu_det.py --ewc-weight 50 --replay-fraction 0.05 --skip-step1

Prints the table and writes it as JSON (``--json``). Machine-dependent: quote it with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _runs import run_lineside, test_metrics  # noqa: E402  (bench/_runs.py)
OLD = ["crazing", "inclusion", "patches"]
NEW = ["pitted_surface", "rolled-in_scale", "scratches"]


def _map(metrics: dict[str, float], classes: list[str]) -> float:
    aps = [metrics.get(f"test/ap_50/{c}", -1.0) for c in classes]
    aps = [max(a, 0.0) for a in aps]  # -1: no detection of a class with ground truth → 0
    return sum(aps) / len(aps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/continual_neu_det", help="folder of the runs (relative to the repository)")
    p.add_argument("--root", default=None, help="NEU-DET folder (default ../shared/data/neu_det)")
    p.add_argument("--ewc-weight", type=float, default=10.0, help="EWC λ (Fisher normalised to mean 1)")
    p.add_argument("--replay-fraction", type=float, default=0.05, help="share of step-1 training images replayed")
    p.add_argument("--step1-epochs", type=int, default=10)
    p.add_argument("--step2-epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-time", default="00:00:06:00", help="wall-time cap of each fit (DD:HH:MM:SS)")
    p.add_argument("--skip-step1", action="store_true", help="reuse OUT/step1 (checkpoint and fisher.pt)")
    p.add_argument("--only", default="plain,ewc,replay,ewc_replay", help="step-2 variants to run")
    p.add_argument("--json", default=None, help="write the table here (default OUT/results.json)")
    a = p.parse_args()
    out = (REPO / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data.image_size", str(a.image_size)] + (["--data.root", a.root] if a.root else [])
    common = ["--trainer.max_time", a.max_time, "--overwrite", "true", *data]
    rows, times = [], {}
    step1 = out / "step1"
    if not a.skip_step1:
        print(f"step 1: {OLD} …", flush=True)
        times["step1"] = run_lineside(["fit", "--config", "configs/neu_det_step1.yaml", "--trainer.default_root_dir", str(step1),
                                    "--trainer.max_epochs", str(a.step1_epochs), *common], out / "step1_fit.log")
    ckpt1 = step1 / "checkpoints" / "last.ckpt"
    if not (a.skip_step1 and (out / "step1_test.log").is_file()):
        run_lineside(["test", "--config", "configs/neu_det_step1.yaml", "--ckpt_path", str(ckpt1), *data], out / "step1_test.log")
    m1 = test_metrics(step1)
    old_after_1 = _map(m1, OLD)
    print(f"step 1: old-class mAP@0.5 {old_after_1:.3f} ({times.get('step1', 0):.0f} s)", flush=True)
    variants = {
        "plain": [],
        "ewc": ["--trainer.callbacks+=lineside.fusion.continual.ElasticWeightConsolidation",
                f"--trainer.callbacks.fisher={step1 / 'fisher.pt'}", f"--trainer.callbacks.weight={a.ewc_weight}"],
        "replay": ["--data.replay_fraction", str(a.replay_fraction)],
    }
    variants["ewc_replay"] = variants["ewc"] + variants["replay"]
    labels = {"plain": "plain fine-tuning", "ewc": f"EWC (λ={a.ewc_weight:g})", "replay": f"replay ({a.replay_fraction:.0%} of step-1 images)",
              "ewc_replay": "EWC + replay"}
    for name in a.only.split(","):
        run = out / (f"{name}_l{a.ewc_weight:g}" if "ewc" in name else name)
        print(f"step 2: {labels[name]} …", flush=True)
        times[name] = run_lineside(["fit", "--config", "configs/neu_det_step2.yaml", "--trainer.default_root_dir", str(run),
                                 "--trainer.max_epochs", str(a.step2_epochs), "--trainer.callbacks.init_args.checkpoint", str(ckpt1),
                                 *variants[name], *common], out / f"{run.name}_fit.log")
        run_lineside(["test", "--config", "configs/neu_det_step2.yaml", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *data],
                  out / f"{run.name}_test.log")
        m = test_metrics(run)
        rows.append({"variant": labels[name], "old_map50_step1": old_after_1, "old_map50": _map(m, OLD), "new_map50": _map(m, NEW),
                     "map50_all": m.get("test/map_50"), "fit_s": times[name],
                     "ap50": {c: m.get(f"test/ap_50/{c}") for c in OLD + NEW}})
        print(f"  old {rows[-1]['old_map50']:.3f}  new {rows[-1]['new_map50']:.3f}  ({times[name]:.0f} s)", flush=True)
    print("\nNEU-DET continual learning, test split (240 images), mAP@0.5")
    print("| step 2 recipe | old classes after step 1 | old classes after step 2 | new classes after step 2 | fit time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['old_map50_step1']:.3f} | {r['old_map50']:.3f} | {r['new_map50']:.3f} | {r['fit_s']:.0f} s |")
    path = Path(a.json) if a.json else out / f"results_{a.only.replace(',', '+')}_l{a.ewc_weight:g}.json"
    path.write_text(json.dumps({"rows": rows, "times_s": times, "args": vars(a), "old": OLD, "new": NEW}, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
