"""How the grading criterion copes with ELPV's imbalanced grades: a measured ablation.

    python bench/criterion_ablation.py [--base configs/quickstart.yaml] [--epochs 3]

Trains the same model/recipe once per criterion variant (same seed, same module-block split)
and prints the best *validation* accuracy and macro-F1 of each (validation blocks only: the
test blocks stay untouched for the final figure), plus the ratio to plain cross-entropy.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "plain CE": {"class_weighting": "none", "weight_dict": {"loss_grade": 1.0}},
    "weighted CE (1/sqrt n)": {"class_weighting": "inverse_sqrt", "weight_dict": {"loss_grade": 1.0}},
    "weighted CE + ordinal EMD": {"class_weighting": "inverse_sqrt", "weight_dict": {"loss_grade": 1.0, "loss_ordinal": 1.0}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs" / "criterion_ablation"))
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    for i, (name, crit) in enumerate(VARIANTS.items()):
        cfg = yaml.safe_load(Path(a.base).read_text())
        run = out / f"variant{i}"
        cfg["trainer"]["max_epochs"] = a.epochs
        cfg["trainer"]["default_root_dir"] = str(run)  # the run folder: logs in run/logs, checkpoints in run/checkpoints
        cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
        cfg["trainer"]["callbacks"] = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"filename": "best", "monitor": "val/macro_f1", "mode": "max", "enable_version_counter": False}}
        ]
        cfg["model"]["criterion"] = {"class_path": "lineside.fusion.GradingCriterion", "init_args": crit}
        if cfg["model"].get("scheduler"):
            cfg["model"]["scheduler"]["init_args"]["T_max"] = a.epochs
        run.mkdir(parents=True, exist_ok=True)
        (run / "variant.yaml").write_text(yaml.safe_dump(cfg))
        print(f"[{name}] training ...", flush=True)
        # --overwrite: a re-run of the ablation replaces its variants' checkpoints
        subprocess.run([sys.executable, "-m", "lineside", "fit", "--config", str(run / "variant.yaml"), "--overwrite"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        latest = max(run.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
        rows = [r for r in csv.DictReader(open(latest)) if r.get("val/macro_f1")]
        best = max(rows, key=lambda r: float(r["val/macro_f1"]))
        results[name] = (float(best["val/acc"]), float(best["val/macro_f1"]), int(best["epoch"]))
    base_f1 = results["plain CE"][1]
    print(f"\ncriterion ablation on ELPV validation blocks ({a.base}, {a.epochs} epochs, best epoch by val macro-F1)")
    print(f"{'criterion':28s} {'val acc':>8s} {'val macro-F1':>13s} {'F1 / plain CE':>14s}")
    for name, (acc, f1, ep) in results.items():
        print(f"{name:28s} {acc:8.3f} {f1:13.3f} {f1 / base_f1:14.2f}")


if __name__ == "__main__":
    main()
