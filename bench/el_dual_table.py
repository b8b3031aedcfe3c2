"""What multi-task buys on EL cells, and what each task weighting costs: the el_dual table.

    nice -n 10 python bench/el_dual_table.py --budget 480            # every run, ≤ 480 s of training each
    python bench/el_dual_table.py --runs grading,sum --steps 40       # a subset, fewer steps
    python bench/el_dual_table.py --step-cost-only                    # per-step cost of each weighting only

One model (configs/el_dual.yaml: EfficientNet-Lite0 + fusion transformer, grading head + FPN
segmentation head) trained the same number of batches in every run, with the data / weighting changed:

* ``grading``: ELPV grades only (el_cracks sampling weight 0): today's grading recipe at this size;
* ``segmentation``: el_cracks masks only (ELPV weight 0), default criterion (focal CE + Dice);
* ``segmentation+cw``: the same with per-class CE weights on the rare classes (the one cheap remedy
  tried for thin cracks: crack ×10, crossing ×10, dark area ×3, busbar and background ×1);
* ``sum`` / ``fixed`` / ``uncertainty`` / ``gradnorm`` / ``upgrad``: both data sets, one batch of one
  data set at a time (weights 1 : 1), ``model.task_weighting`` set to the method.

Each run is ``lineside fit`` (last checkpoint after ``--steps`` batches, or when ``--budget`` seconds of
training are spent: ``trainer.max_time``) then ``lineside test`` on the held-out splits: ELPV's
module-block test split (20 % of the 60-cell blocks, seed 0, as configs/el_grading.yaml) and
el_cracks' held-out modules (20 % of the modules, seed 0). Validation runs once, at the end. Metrics
come from the test logs (the deployable module in fp32, as ``lineside score`` computes them). CPU time
is the children's user + system time of fit and test, wall the elapsed time.

The per-step cost of each weighting is timed in-process (CPU seconds of one torch thread, so a
loaded machine does not blur it) on one real batch of each data set (alternating, as training
draws them), after warm-up, mean over batches: forward, losses (GradNorm's extra gradient to
the shared layer), backward / UPGrad's per-task gradients and aggregation, optimizer step. Nothing
here reads a test split to choose anything.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "el_dual.yaml"
METHODS = ("sum", "fixed", "uncertainty", "gradnorm", "upgrad")
RUNS = ("grading", "segmentation", "segmentation+cw", *METHODS)
FIXED_WEIGHTS = {"grading": 0.86, "segmentation": 1.14}  # the seed's 0.3 : 0.4 ratio, summing to the task count
REMEDY_CLASS_WEIGHTS = [1.0, 3.0, 10.0, 10.0, 1.0]  # background, dark_area, crossing, crack, busbar


def run_config(name: str, args: argparse.Namespace, out: Path) -> dict:
    """The el_dual config of one table row (run folder ``out/<name>``)."""
    cfg = yaml.safe_load(BASE.read_text())
    cfg["seed_everything"] = 0
    t = cfg["trainer"]
    t.update({"accelerator": "cpu", "precision": "32-true", "max_epochs": 1, "max_steps": args.steps, "log_every_n_steps": 1,
              "default_root_dir": str(out / name), "num_sanity_val_steps": 0, "enable_progress_bar": False,
              "limit_val_batches": 0,  # no validation: the last checkpoint is tested, nothing is chosen
              "max_time": f"00:{args.budget // 3600:02d}:{args.budget % 3600 // 60:02d}:{args.budget % 60:02d}"})
    t["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
    t["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"filename": "last_step", "save_last": True, "enable_version_counter": False}}]
    m = cfg["model"]
    m["scheduler"] = None  # one short epoch: a constant LR
    encoder = m["model"]["init_args"]["image_encoder"]["init_args"]
    encoder["frozen_levels"] = args.frozen_levels  # the budget: stem and early stages frozen in every run
    m["tta_views"] = 1
    data = cfg["data"]["init_args"]
    data["steps_per_epoch"] = args.steps
    elpv, cracks = data["datasets"]["elpv"]["init_args"], data["datasets"]["el_cracks"]["init_args"]
    elpv.update({"image_size": args.elpv_size, "batch_size": args.elpv_batch, "num_workers": args.workers})
    cracks.update({"image_size": args.seg_size, "batch_size": args.seg_batch, "num_workers": args.workers})
    criteria = {"segmentation": {"class_path": "lineside.fusion.segmentation_criterion.SegmentationCriterion",
                                 "init_args": {"num_classes": 4, "focal_gamma": 2.0}}}
    if name == "segmentation+cw" or (name in METHODS and args.seg_remedy):
        criteria["segmentation"]["init_args"]["class_weights"] = REMEDY_CLASS_WEIGHTS
    m["criteria"] = criteria
    if name == "grading":
        data["weights"] = {"elpv": 1.0, "el_cracks": 0.0}
    elif name.startswith("segmentation"):
        data["weights"] = {"elpv": 0.0, "el_cracks": 1.0}
    else:
        data["weights"] = {"elpv": 1.0, "el_cracks": 1.0}
        m["task_weighting"] = name
        if name == "fixed":
            m["task_weights"] = dict(FIXED_WEIGHTS)
        if name == "gradnorm":
            m["task_weighting_options"] = {"alpha": args.alpha}
    return cfg


def _run(cmd: list[str], log: Path, nice: int, threads: int | None) -> tuple[float, float]:
    """Runs ``cmd`` (niced), output to ``log``; → (wall s, CPU s of the process and its children:
    ``/usr/bin/time``-style, read from ``os.wait4`` so parallel runs do not mix)."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["nice", "-n", str(nice), *cmd], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed (exit {code}); see {log}")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def _metrics(run: Path, stage: str) -> dict[str, float]:
    """The last logged value of every ``<stage>/…`` metric of the run's newest log with one."""
    found: dict[str, float] = {}
    for path in sorted(run.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        for row in csv.DictReader(open(path)):
            for k, v in row.items():
                if k and k.startswith(f"{stage}/") and v not in ("", None):
                    found[k] = float(v)
    return found


def train_and_test(name: str, args: argparse.Namespace, out: Path) -> dict:
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "table_config.yaml"  # (the fit saves its resolved config as config.yaml)
    cfg_path.write_text(yaml.safe_dump(run_config(name, args, out), sort_keys=False))
    py = [sys.executable, "-m", "lineside"]
    print(f"[{name}] fit ({args.steps} batches, ≤ {args.budget} s) ...", flush=True)
    fit_wall, fit_cpu = _run([*py, "fit", "--config", str(cfg_path), "--overwrite"], run / "fit.log", args.nice, args.threads)
    ckpt = run / "checkpoints" / "last.ckpt"
    print(f"[{name}] test ({fit_wall:.0f} s fit) ...", flush=True)
    test_wall, test_cpu = _run([*py, "test", "--config", str(cfg_path), "--ckpt_path", str(ckpt)], run / "test.log", args.nice, args.threads)
    steps = _train_batches(run)
    result = {"name": name, "fit_wall_s": fit_wall, "fit_cpu_s": fit_cpu, "test_wall_s": test_wall, "test_cpu_s": test_cpu,
              "train_batches": steps, "test": _metrics(run, "test"), "val": _metrics(run, "val")}
    (run / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _train_batches(run: Path) -> int | None:
    """Training batches seen: rows with a ``train/loss`` (logged every batch; under ``upgrad`` the
    step counts optimizer steps, so rows are counted, not steps)."""
    paths = sorted(run.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    fit = [p for p in paths if any(r.get("train/loss") for r in csv.DictReader(open(p)))]
    return sum(1 for r in csv.DictReader(open(fit[-1])) if r.get("train/loss")) if fit else None


# --------------------------------------------------------------------------- per-step cost, in-process


def step_costs(args: argparse.Namespace, methods=METHODS, repeats: int = 3) -> dict[str, float]:
    """Mean CPU seconds per training batch of each weighting, one torch thread (module docstring).
    CPU time of this process, not wall time: on a shared, loaded machine it stays comparable."""
    import importlib

    import torch

    torch.set_num_threads(1)

    from lineside.fusion.lightning_module import InspectionModule

    torch.manual_seed(0)
    cfg = run_config("sum", args, Path("/tmp"))
    batches = []
    for member in ("elpv", "el_cracks"):
        spec = cfg["data"]["init_args"]["datasets"][member]
        mod, _, cls = spec["class_path"].rpartition(".")
        dm = getattr(importlib.import_module(mod), cls)(**dict(spec["init_args"], num_workers=0))
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))

    def build(spec):
        if isinstance(spec, dict) and "class_path" in spec:
            mod, _, cls = spec["class_path"].rpartition(".")
            kwargs = {k: build(v) for k, v in (spec.get("init_args") or {}).items()}
            if cls == "ImageEncoder":
                kwargs["pretrained"] = False  # timing only
            return getattr(importlib.import_module(mod), cls)(**kwargs)
        if isinstance(spec, dict):
            return {k: build(v) for k, v in spec.items()}
        return spec

    costs = {}
    for method in methods:
        model = build(copy.deepcopy(cfg["model"]["model"]))
        criteria = {"segmentation": build(cfg["model"]["criteria"]["segmentation"])}
        module = InspectionModule(model, criteria=criteria, task_weighting=method,
                                  task_weights=dict(FIXED_WEIGHTS) if method == "fixed" else None,
                                  task_weighting_options={"alpha": args.alpha} if method == "gradnorm" else None)
        module.train()
        opt = module.configure_optimizers()
        if method == "upgrad":
            module.optimizers = lambda: opt  # outside a Trainer: the step UPGrad takes
            module.lr_schedulers = lambda: None
            module.task_weighting.expect_tasks(["grading", "segmentation"])
        times = []
        for k in range(2 + 2 * repeats):
            batch = batches[k % 2]
            t0 = time.process_time()
            losses = module._losses(module.model(**module.model.batch_inputs(batch)), batch)
            if method == "upgrad":
                module.task_weighting.manual_step(module, losses)
            else:
                opt.zero_grad()
                losses["loss"].backward()
                opt.step()
            if k >= 2:
                times.append(time.process_time() - t0)
        costs[method] = statistics.mean(times)  # the mean: upgrad's aggregation + step come every ~2nd batch
        print(f"[step cost] {method}: {costs[method]:.3f} CPU s/batch (mean of {len(times)}; median "
              f"{statistics.median(times):.3f})", flush=True)
    return costs


# --------------------------------------------------------------------------- the table


def _fmt(v, pct=False, digits=3) -> str:
    if v is None or v != v:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def table(results: list[dict], costs: dict[str, float]) -> str:
    rows = ["| model | ELPV acc / macro-F1 / AUROC (test blocks) | crack IoU / crack F1@2px / dark IoU (held-out modules) "
            "| batches | fit wall / CPU (s) | test wall (s) | CPU s per batch, 1 thread |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t, name = r["test"], r["name"]
        grades = name not in ("segmentation", "segmentation+cw")
        seg = name != "grading"
        g = (f"{_fmt(t.get('test/acc'), True)} / {_fmt(t.get('test/macro_f1'))} / {_fmt(t.get('test/auroc_defective'))}"
             if grades else "–")
        s = (f"{_fmt(t.get('test/iou/crack'))} / {_fmt(t.get('test/crack_f1_2px'))} / {_fmt(t.get('test/iou/dark_area'))}"
             if seg else "–")
        label = f"el_dual, {name}" if name in METHODS else f"{name} only" if name in ("grading", "segmentation") else \
            "segmentation only, crack class weights"
        cost = _fmt(costs.get(name), digits=2) if name in METHODS else "–"
        rows.append(f"| {label} | {g} | {s} | {r.get('train_batches') or '–'} | {r['fit_wall_s']:.0f} / {r['fit_cpu_s']:.0f} "
                    f"| {r['test_wall_s']:.0f} | {cost} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=480, help="training seconds per run at most (trainer.max_time)")
    ap.add_argument("--steps", type=int, default=120, help="training batches per run")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    ap.add_argument("--elpv-size", type=int, default=128)
    ap.add_argument("--seg-size", type=int, default=160)
    ap.add_argument("--elpv-batch", type=int, default=16)
    ap.add_argument("--seg-batch", type=int, default=8)
    ap.add_argument("--frozen-levels", type=int, default=3, help="image encoder levels kept frozen (el_dual.yaml: 1)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=1.5, help="GradNorm asymmetry")
    ap.add_argument("--seg-remedy", action="store_true", help="the el_dual runs use the crack class weights too")
    ap.add_argument("--step-cost-only", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the table of the runs already in --out, run nothing")
    ap.add_argument("--no-step-cost", action="store_true")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the fit / test processes")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each with --threads threads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's; 1 when --parallel > 1)")
    ap.add_argument("--out", default=str(REPO / "runs" / "el_dual_table"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    bad = sorted(set(names) - set(RUNS))
    if bad:
        raise SystemExit(f"--runs: unknown {bad}; choose from {RUNS}")
    costs_path = out / "step_costs.json"
    costs = json.loads(costs_path.read_text()) if costs_path.is_file() else {}
    if a.report:
        a.no_step_cost, names = True, []
    if not a.no_step_cost:
        costs.update(step_costs(a, [n for n in names if n in METHODS] if not a.step_cost_only else METHODS))
        costs_path.write_text(json.dumps(costs, indent=1))
    if a.step_cost_only:
        return
    if a.report:
        every = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
        print(table([every[n] for n in RUNS if n in every], json.loads(costs_path.read_text()) if costs_path.is_file() else {}))
        return
    if a.parallel > 1 and a.threads is None:
        a.threads = 1
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:  # each run is its own process
        results = list(pool.map(lambda n: train_and_test(n, a, out), names))
    every = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
    ordered = [every[n] for n in RUNS if n in every]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"ELPV {a.elpv_size} px × {a.elpv_batch}, el_cracks {a.seg_size} px × {a.seg_batch}, {a.steps} batches, "
          f"≤ {a.budget} s training per run, {a.parallel} run(s) at a time, nice {a.nice}\n")
    print(table(ordered, costs))
    del results


if __name__ == "__main__":
    main()
