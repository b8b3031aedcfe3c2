"""``lineside fit --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu``: two real
processes (gloo) on the tiny configs; the run folder, the checkpoints and the metrics CSV's columns
are those of a one-process run. The multi-task config trains heads that some batches leave without
labels (DDP looks for unused parameters) on each process's share of every member's data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from test_multitask_data import _cells_manifest, _neu_det_tree

STEPS = 2
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
QUICK = ["--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]


def _fit_two_processes(config: Path, *extra: str, cwd: Path) -> str:
    """``python -m lineside fit`` with DDP on two CPU processes; returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "lineside", "fit", "--config", str(config), *DDP, *QUICK, *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    assert "Starting with 2 processes" in out and "GLOBAL_RANK: 1" in out, out[-3000:]
    return out


def _fit_one_process(config: Path, *extra: str) -> None:
    from lineside.fusion.training_cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", str(config), *QUICK, *extra])
    finally:
        torch.set_num_threads(threads)


def _header(run: Path) -> list[str]:
    files = sorted(run.rglob("metrics.csv"))
    assert len(files) == 1, f"one metrics.csv per fit in {run}, found {files}"
    with open(files[0], newline="") as fh:
        return next(csv.reader(fh))


def _assert_same_run(ddp_run: Path, one_run: Path, tasks: list[str]) -> None:
    """Same files in the run folder, loadable checkpoints with the same keys and record, same metric columns."""
    from lineside.export.checkpoint import load_inspection_model

    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}

    assert files(ddp_run) == files(one_run)
    for name in ("best.ckpt", "last.ckpt"):
        ddp_ckpt = torch.load(ddp_run / "checkpoints" / name, map_location="cpu", weights_only=False)
        one_ckpt = torch.load(one_run / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert ddp_ckpt["global_step"] == one_ckpt["global_step"] == STEPS
        assert set(ddp_ckpt["state_dict"]) == set(one_ckpt["state_dict"])
        assert ddp_ckpt["lineside"] == one_ckpt["lineside"] and ddp_ckpt["lineside"]["tasks"] == tasks
        assert all(torch.isfinite(v).all() for v in ddp_ckpt["state_dict"].values() if v.is_floating_point())
        loaded = load_inspection_model(ddp_run / "checkpoints" / name)  # the pure model, without Lightning
        assert loaded.model.task_names == tasks
    header = _header(ddp_run)
    assert header == _header(one_run)
    assert "train/loss" in header and any(h.startswith("val/") for h in header)
    with open(next(ddp_run.rglob("metrics.csv")), newline="") as fh:
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r["train/loss"]]
    assert len(losses) == STEPS and all(l == l for l in losses)


def _config(src: str, tmp_path: Path, run: str, edit=None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / src).read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / run)
    if edit is not None:
        edit(cfg)
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_config_on_two_processes_matches_one_process_run(tmp_path: Path) -> None:
    _fit_two_processes(_config("tiny.yaml", tmp_path, "ddp"), cwd=tmp_path)
    _fit_one_process(_config("tiny.yaml", tmp_path, "one"))
    _assert_same_run(tmp_path / "ddp", tmp_path / "one", ["grading"])


@pytest.mark.slow
def test_multitask_config_on_two_processes_trains_heads_without_labels_in_a_batch(tmp_path: Path) -> None:
    """configs/tiny_multitask.yaml: each batch carries grades or boxes, never both, so one head per
    step gets no gradient; plain ``ddp`` works (find_unused_parameters is switched on for it)."""
    cells, boxes = str(_cells_manifest(tmp_path / "cells")), str(_neu_det_tree(tmp_path / "neu"))

    def data(cfg: dict) -> None:
        members = cfg["data"]["init_args"]["datasets"]
        members["cells"]["init_args"]["manifest"], members["boxes"]["init_args"]["root"] = cells, boxes
        cfg["data"]["init_args"]["steps_per_epoch"] = STEPS  # one batch of each member, then validation

    out = _fit_two_processes(_config("tiny_multitask.yaml", tmp_path, "ddp", data), cwd=tmp_path)
    assert "find_unused_parameters=True" in out
    _fit_one_process(_config("tiny_multitask.yaml", tmp_path, "one", data))
    _assert_same_run(tmp_path / "ddp", tmp_path / "one", ["grading", "localization"])
    header = _header(tmp_path / "ddp")
    assert {"train/loss_grading", "train/loss_localization", "val/acc", "val/map_50"} <= set(header)


def test_multitask_members_are_sharded_across_processes(tmp_path: Path) -> None:
    """Under DDP every member's training loader gives each process a disjoint share of its data,
    reshuffled at every new pass; the member order (which head trains) is the same on every process."""
    from lineside.fusion.datamodule import InspectionDataModule
    from lineside.fusion.multitask_datamodule import MemberBatches, shard_loader

    dm = InspectionDataModule(manifest=str(_cells_manifest(tmp_path / "cells", n=24)), class_names=["ok", "crack"], image_size=32,
                              batch_size=4, num_workers=0, augment="none", block_size=4)
    dm.setup("fit")
    full = dm.train_dataloader()
    shards = [shard_loader(full, rank, 2, seed=0) for rank in range(2)]
    n = len(full.dataset)
    assert all(len(s) == (n + 1) // 2 // 4 for s in shards) and len(shards[0]) >= 1
    passes = []  # per process: its first and its second pass over its share
    for loader in shards:
        batches = MemberBatches({"cells": loader}, {"cells": 1.0}, steps=2 * len(loader))
        paths = [p for batch in batches for p in batch["path"]]
        first, second = paths[: len(paths) // 2], paths[len(paths) // 2:]
        assert len(first) == len(set(first)) == 4 * len(loader)  # whole batches of 4, no cell twice in a pass
        assert first != second  # the second pass is reshuffled
        passes.append((set(first), set(second)))
    for k in range(2):  # within a pass, each process its own cells (one repeated at most when n is odd)
        assert len(passes[0][k] & passes[1][k]) <= n % 2
        assert len(passes[0][k] | passes[1][k]) >= n - 2 * 3  # together every cell but the ragged ends
