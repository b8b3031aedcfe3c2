"""Shared pieces of the benchmark scripts: run a ``lineside`` command and read its test metrics, and time
backends side by side. Imported as ``from _runs import …`` (the scripts run as ``python bench/NAME.py``)."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_lineside(args: list[str], log: Path) -> float:
    """Run ``lineside ARGS`` (same interpreter, from the repository root), output to ``log``; seconds of wall time.
    A failing command stops the benchmark with the log's last lines."""
    cmd = [sys.executable, "-c", "import sys; from lineside.cli import main; sys.exit(main())", *args]
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if rc:
        tail = "".join(open(log).readlines()[-15:])
        raise SystemExit(f"lineside {' '.join(args[:3])} … failed (exit {rc}); log {log}:\n{tail}")
    return time.time() - t0


def test_metrics(run: Path) -> dict[str, float]:
    """The test row of the newest ``logs/version_N/metrics.csv`` of the run folder ``run``."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for v in reversed(versions):
        f = v / "metrics.csv"
        if f.is_file():
            rows = [r for r in csv.DictReader(open(f)) if any(k.startswith("test/") and r[k] for k in r)]
            if rows:
                return {k: float(x) for k, x in rows[-1].items() if k.startswith("test/") and x}
    raise SystemExit(f"{run}: no test metrics found")


def interleaved_latency(backends: dict, frames: np.ndarray, rounds: int) -> dict[str, float]:
    """Median batch-1 seconds per backend, the backends called in turn on the same frame each round (3 warm-up
    calls each), so a change of machine load touches them alike."""
    for b in backends.values():
        for i in range(3):
            b({"image": np.ascontiguousarray(frames[i % len(frames)][None])})
    times: dict[str, list[float]] = {k: [] for k in backends}
    for r in range(rounds):
        x = np.ascontiguousarray(frames[r % len(frames)][None])
        for k, b in backends.items():
            t0 = time.perf_counter()
            b({"image": x})
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
