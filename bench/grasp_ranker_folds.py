"""Leave-tools-out folds: the candidate-then-score grasp ranker vs the slab rule vs the analytic sampler,
under the lenient and the strict check, on the 15 real workshop tools, every method on the same clouds.

    python bench/grasp_ranker_folds.py [--views-per-tool 4] [--procedural-views 240] [--tool-train-views 4]
                                       [--epochs 6] [--crop-points 32] [--per-view 64] [--threads 2] [--workers 2]
                                       [--json runs/grasp_ranker/folds.json]

Views. Test: the views of ``bench/grasp_tools.py`` (:class:`~lineside.fusion.grasp_datamodule.GraspDataModule`
test split, all 15 tools, ``--views-per-tool`` each, seed 2, 1,024 points, 0.5-0.7 m, 0.5 mm depth noise,
2 % dropouts), so the baselines' figures match that bench. Training: ``--procedural-views`` procedural parts
(seed 0, 0.3-0.5 m) and ``--tool-train-views`` other views of each tool (seed 1000; a tool's are used only in
the folds where it is not tested).

Folds (deterministic): the sorted tool names dealt round-robin into 5 folds of 3 (fold ``f`` tests
``tools[f::5]``, as ``GraspDataModule(fold=f, num_folds=5)``).

Methods, each ranked best first and judged on the tool's mesh by both protocols
(:func:`~lineside.pointcloud.grasp_dataset.grasp_success`):

* ``ranker_proc``: :class:`~lineside.fusion.grasp_ranker.GraspRanker` trained on procedural views only
  (one model for every fold: it has seen none of the tools);
* ``ranker_tools``: trained on procedural views + the fold's 12 training tools;
* ``slab``: :func:`~lineside.pointcloud.grasp_dataset.slab_grasp_baseline`;
* ``analytic``: :func:`~lineside.pointcloud.grasp_dataset.analytic_grasp_baseline`;
* ``oracle``: the share of views where any candidate passes (the ranker's ceiling).

Rendered views, candidates and their mesh labels are cached under ``--cache`` (default
``runs/grasp_ranker/cache``), keyed by their settings, so a re-run only trains and ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from lineside.fusion.grasp_datamodule import GraspDataModule
from lineside.fusion.grasp_ranker import (
    GraspRanker,
    GraspRankerConfig,
    rank_candidates,
)
from lineside.fusion.grasp_ranker_train import train_ranker
from lineside.pointcloud.grasp_candidates import (
    CandidateConfig,
    candidate_crops,
    candidate_features,
    grasp_candidates,
)
from lineside.pointcloud.grasp_dataset import (
    GraspViewConfig,
    PartGraspDataset,
    WorkshopToolsDataset,
    analytic_grasp_baseline,
    load_mesh,
    slab_grasp_baseline,
)
from lineside.pointcloud.grasp_labels import (
    GraspScene,
    evaluate_grasps,
    evaluate_grasps_strict,
)

REPO = Path(__file__).resolve().parents[1]
CACHE_VERSION = 1
CACHE_CROP_POINTS = 128  # crops are cached at this size and cut to --crop-points
K = 5
PROTOCOLS = ("lenient", "strict")


def _observed(s: dict) -> tuple[np.ndarray, np.ndarray]:
    m = s["point_mask"]
    return (s["points"][m] * s["scale"] + s["center"]).astype(np.float64), s["features"][m].astype(np.float64)


def _label(scene: GraspScene, grasps: np.ndarray, gripper, mu: float) -> tuple[np.ndarray, np.ndarray]:
    if len(grasps) == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    lenient = evaluate_grasps(scene, grasps, gripper, mu)[0]
    strict = evaluate_grasps_strict(scene, grasps, gripper, mu).ok
    return lenient, strict


# (dataset, gripper, mu, candidate config, crop points, out dir, with baselines) per worker process
_JOB: dict = {}


def _init(job: dict) -> None:
    torch.set_num_threads(1)
    _JOB.update(job)


def _prepare_one(index: int) -> str:
    ds, gripper, mu, ccfg, out = _JOB["ds"], _JOB["gripper"], _JOB["mu"], _JOB["ccfg"], Path(_JOB["out"])
    path = out / f"{index}.npz"
    if path.exists():
        return str(path)
    s = ds[index]
    pts, nrm = _observed(s)
    name = ds.tool_name(index) if hasattr(ds, "tool_name") else str(json.loads(s["mesh"]).get("kind"))
    cand = grasp_candidates(pts, nrm, gripper, ccfg, rng=index)
    scene = GraspScene(load_mesh(s["mesh"]))
    rec = {"grasps": cand.grasps, "source": cand.source, "name": np.array(name), "mesh": np.array(s["mesh"])}
    rec["lenient"], rec["strict"] = _label(scene, cand.grasps, gripper, mu)
    rec["crops"] = candidate_crops(pts, nrm, cand.grasps, _JOB["crop_points"], gripper, rng=index)
    rec["features"] = candidate_features(pts, nrm, cand.grasps, cand.source, gripper)
    if _JOB["baselines"]:  # exactly as bench/grasp_tools.py: rng = the view's index
        for tag, fn in (("analytic", analytic_grasp_baseline), ("slab", slab_grasp_baseline)):
            g = fn(pts, nrm, k=K, gripper=gripper, rng=int(s["part_id"]))
            rec[f"{tag}_grasps"] = g
            rec[f"{tag}_lenient"], rec[f"{tag}_strict"] = _label(scene, g, gripper, mu)
    tmp = path.with_name(f".{index}.{np.random.default_rng().integers(1 << 30)}.tmp.npz")
    np.savez_compressed(tmp, **rec)
    tmp.replace(path)
    return str(path)


def prepare(ds, name: str, args, gripper, mu: float, ccfg: CandidateConfig, baselines: bool) -> list[dict]:
    """Candidates + mesh labels (+ baselines) for every view of ``ds``, cached; returns the records."""
    key = hashlib.sha1(json.dumps({"v": CACHE_VERSION, "ds": str(getattr(ds, "cache_dir", "")), "cand": asdict(ccfg),
                                   "gripper": asdict(gripper), "mu": mu, "crop": CACHE_CROP_POINTS, "base": baselines},
                                  sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = Path(args.cache) / f"{name}_{key}"
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(ds)) if not (out / f"{i}.npz").exists()]
    if todo:
        from tqdm.auto import tqdm

        job = {"ds": ds, "gripper": gripper, "mu": mu, "ccfg": ccfg, "out": str(out), "crop_points": CACHE_CROP_POINTS, "baselines": baselines}
        t = time.perf_counter()
        if args.workers > 1:
            with mp.get_context("fork").Pool(args.workers, _init, (job,)) as pool:
                for _ in tqdm(pool.imap_unordered(_prepare_one, todo), total=len(todo), desc=f"{name} views", mininterval=10):
                    pass
        else:
            _init(job)
            for i in tqdm(todo, desc=f"{name} views", mininterval=10):
                _prepare_one(i)
        print(f"{name}: {len(todo)} views rendered, candidates labelled in {time.perf_counter() - t:.0f} s -> {out}", flush=True)
    recs = []
    for i in range(len(ds)):
        with np.load(out / f"{i}.npz") as z:
            recs.append({k: z[k] for k in z.files})
        recs[-1]["name"] = str(recs[-1]["name"])
    return recs


def _stack(recs: list[dict], crop_points: int, per_view: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Training arrays: at most ``per_view`` candidates of each view (seeded), crops cut to ``crop_points``
    (the cached crops are a random order of the crop's points, so the first ``crop_points`` are a random subset)."""
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[], [], [], []]
    for r in recs:
        n = len(r["grasps"])
        idx = np.sort(rng.choice(n, per_view, replace=False)) if n > per_view else np.arange(n)
        for j, key in enumerate(("crops", "features", "strict", "lenient")):
            out[j].append(r[key][idx][:, :crop_points] if key == "crops" else r[key][idx])
    return tuple(np.concatenate(o) for o in out)


def _topk_ok(ranker: GraspRanker, rec: dict, k: int) -> dict[str, np.ndarray]:
    """Rank one view's cached candidates; (k,) success flags of the top-k per protocol (False where fewer)."""
    out = {p: np.zeros(k, bool) for p in PROTOCOLS}
    if len(rec["grasps"]) == 0:
        return out
    order = rank_candidates(ranker, rec["crops"][:, : ranker.config.crop_points], rec["features"], rec["grasps"], k)
    for p in PROTOCOLS:
        out[p][: len(order)] = rec[p][order]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views-per-tool", type=int, default=4)
    ap.add_argument("--procedural-views", type=int, default=240)
    ap.add_argument("--tool-train-views", type=int, default=4)
    ap.add_argument("--tools-root", default=None)
    ap.add_argument("--cache", default=str(REPO / "runs" / "grasp_ranker" / "cache"))
    ap.add_argument("--crop-points", type=int, default=32, help="points per candidate crop the ranker sees")
    ap.add_argument("--per-view", type=int, default=64, help="training candidates drawn per view")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lenient-weight", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes rendering and labelling uncached views")
    ap.add_argument("--prepare-only", action="store_true", help="fill the cache and stop")
    ap.add_argument("--save-dir", default=str(REPO / "runs" / "grasp_ranker"), help="ranker files go here")
    ap.add_argument("--json", default=str(REPO / "runs" / "grasp_ranker" / "folds.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dm = GraspDataModule(num_points=1024, num_samples=300, views_per_tool=args.views_per_tool, test_tools=None, num_workers=args.workers,
                         tools_root=args.tools_root)
    gripper, mu = dm.gripper, float(dm.point_config["mu"])
    tools = dm.all_tools()
    folds = [tools[f::5] for f in range(5)]
    ccfg = CandidateConfig(mu=mu)
    t0 = time.perf_counter()
    test = prepare(dm.dataset("test"), "test", args, gripper, mu, ccfg, baselines=True)
    # training views: the labeller is not needed (candidates are labelled on the mesh), so it runs minimal
    cheap = {k: v for k, v in asdict(dm.view_config()).items() if k not in ("gripper", "num_samples", "max_grasps")}
    proc_cfg = GraspViewConfig(**{**cheap, "num_samples": 4, "max_grasps": 4}, gripper=gripper)
    tool_cfg = GraspViewConfig(**{**cheap, "distance": dm.tool_distance, "num_samples": 4, "max_grasps": 4}, gripper=gripper)
    proc_ds = PartGraspDataset(args.procedural_views, proc_cfg, seed=0, cache_dir=dm.cache_dir)
    proc = prepare(proc_ds, "procedural", args, gripper, mu, ccfg, baselines=False)
    tool_ds = WorkshopToolsDataset(dm.resolved_tools_root, tools, args.tool_train_views, tool_cfg, seed=1000, cache_dir=dm.cache_dir)
    tool_train = prepare(tool_ds, "tooltrain", args, gripper, mu, ccfg, baselines=False)
    t_prep = time.perf_counter() - t0
    if args.prepare_only:
        return {}

    save = Path(args.save_dir)
    save.mkdir(parents=True, exist_ok=True)
    cfg = GraspRankerConfig(crop_points=args.crop_points)
    train_kw = {"config": cfg, "candidates": ccfg, "gripper": gripper, "epochs": args.epochs, "lenient_weight": args.lenient_weight, "seed": 0}
    t = time.perf_counter()
    ranker_proc = train_ranker(*_stack(proc, args.crop_points, args.per_view), **train_kw)
    ranker_proc.save(save / "ranker_procedural.pt")
    t_train = [time.perf_counter() - t]
    methods = ("ranker_proc", "ranker_tools", "slab", "analytic")
    ok = {(m, p): np.zeros((len(test), K), bool) for m in methods for p in PROTOCOLS}
    oracle = {p: np.array([bool(r[p].any()) for r in test]) for p in PROTOCOLS}
    names = np.array([r["name"] for r in test])
    for i, r in enumerate(test):
        for tag in ("slab", "analytic"):
            for p in PROTOCOLS:
                n = len(r[f"{tag}_{p}"])
                ok[tag, p][i, :n] = r[f"{tag}_{p}"][:K]
        for p, v in _topk_ok(ranker_proc, r, K).items():
            ok["ranker_proc", p][i] = v
    for f, held in enumerate(folds):
        train_recs = proc + [r for r in tool_train if r["name"] not in held]
        assert not any(r["name"] in held for r in train_recs), "a held-out tool leaked into training"
        t = time.perf_counter()
        ranker = train_ranker(*_stack(train_recs, args.crop_points, args.per_view), **train_kw)
        t_train.append(time.perf_counter() - t)
        ranker.save(save / f"ranker_fold{f}.pt")
        for i in np.flatnonzero(np.isin(names, held)):
            for p, v in _topk_ok(ranker, test[i], K).items():
                ok["ranker_tools", p][i] = v
        print(f"fold {f}: held out {held}; trained on {len(train_recs)} views in {t_train[-1]:.0f} s", flush=True)

    rows = []
    for tool in [*tools, "ALL"]:
        sel = np.ones(len(test), bool) if tool == "ALL" else names == tool
        row = {"tool": tool, "views": int(sel.sum())}
        for p in PROTOCOLS:
            row[f"oracle_{p}"] = float(oracle[p][sel].mean())
            for m in methods:
                row[f"{m}_{p}_top1"] = float(ok[m, p][sel, :1].any(1).mean())
                row[f"{m}_{p}_top5"] = float(ok[m, p][sel, :5].any(1).mean())
        rows.append(row)
    print(f"folds (sorted tools, fold f tests tools[f::5]): {folds}")
    print(f"views: {args.views_per_tool} per tool (seed 2, as bench/grasp_tools.py); training: {len(proc)} procedural views, "
          f"{args.tool_train_views} views per training tool (seed 1000); candidates per view: median "
          f"{int(np.median([len(r['grasps']) for r in test]))}")
    head = f"{'tool':<20}{'views':>5} {'orac L/S':>9}  " + "  ".join(f"{m:>19}" for m in methods)
    print(head + "\n" + " " * 36 + "  ".join(f"{'L1  L5  S1  S5':>19}" for _ in methods))
    print("-" * len(head))
    for r in rows:
        cells = "  ".join(" ".join(f"{r[f'{m}_{p}_top{k}']:.2f}" for p in PROTOCOLS for k in (1, 5)).rjust(19) for m in methods)
        print(f"{r['tool']:<20}{r['views']:>5} {r['oracle_lenient']:.2f}/{r['oracle_strict']:.2f}  {cells}")
    print(f"machine: 2 torch threads; cache/prepare {t_prep:.0f} s, training {sum(t_train):.0f} s for {len(t_train)} rankers "
          f"({args.epochs} epochs)")
    result = {"folds": folds, "views_per_tool": args.views_per_tool, "procedural_views": len(proc), "tool_train_views": args.tool_train_views,
              "epochs": args.epochs, "candidates": asdict(ccfg), "ranker": asdict(cfg), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
