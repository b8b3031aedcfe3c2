"""Batch scoring on Ray Data vs single-process ``lineside score``: rows/s and ratios, measured in one run.

    python bench/ray_throughput.py [--model MODEL.onnx|CKPT] [--images 300] [--batch-size 32] [--repeats 2]

The same ONNX artefact scores the same real ELPV cell files (the first ``--images`` of the dataset)
three ways, interleaved, ``--repeats`` times each: ``lineside score`` in this process
(:func:`lineside.runtime.score.score`, ONNX Runtime with its default threads and decoding threads), and
``--engine ray`` (:func:`lineside.runtime.ray_score.score_on_ray`) with 1 and with 2 ONNX Runtime actors
(1 thread each, decoding in Ray tasks) on a local Ray instance with every core. Each figure is the
whole job (a fresh results file; for Ray the actors' start — a new process importing the runtime and
opening the model — is included, the Ray instance's own start is not): rows / job seconds; and for
Ray the rate of one busy actor (rows / the actors' summed seconds inside their batches), the figure to
size a cluster by. The best of the repeats is printed, and every ratio is against the single-process
job figure.

Without ``--model`` the model is configs/quickstart.yaml's (ImageNet-initialised, throughput does not
depend on trained weights), exported once to ONNX with the parity check.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml  # noqa: E402

from lineside.runtime.open_model import open_model  # noqa: E402
from lineside.runtime.ray_score import ray_session, score_on_ray  # noqa: E402
from lineside.runtime.score import score  # noqa: E402
from lineside.vision.elpv import ELPV_GRADE_NAMES, elpv_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _artefact(model: str | None, tmp: Path) -> str:
    """An ONNX file: ``model`` itself, a checkpoint's cached export, or the quickstart model exported here."""
    if model and model.lower().endswith(".onnx"):
        return model
    if model:
        return open_model(model).path
    from lineside.export.checkpoint import LoadedModel, instantiate_config
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.verify import verify_artefact

    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    net = instantiate_config(cfg["model"]["model"], offline_weights=False).eval()
    loaded = LoadedModel(net, ELPV_GRADE_NAMES, int(cfg["data"].get("image_size", 224)), net.in_chans, 1)
    result = export_onnx(loaded, tmp / "onnx", parity_images=8, verify=verify_artefact)
    assert result.ok, result.parity.table()
    return str(result.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an .onnx artefact or a checkpoint (default: the quickstart model)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    paths = [r.path for r in elpv_records()[: a.images]]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = _artefact(a.model, tmp)
        runs = {"lineside score (1 process)": lambda out: score(model, paths, out, batch_size=a.batch_size, progress=False),
                "--engine ray, 1 actor": lambda out: score_on_ray(model, paths, out, actors=1, batch_size=a.batch_size, progress=False),
                "--engine ray, 2 actors": lambda out: score_on_ray(model, paths, out, actors=2, batch_size=a.batch_size, progress=False)}
        best = {name: 0.0 for name in runs}
        steady = {name: float("nan") for name in runs}  # per busy actor (Ray runs)
        with ray_session(None, os.cpu_count()):
            score_on_ray(model, paths[: a.batch_size], tmp / "warm.csv", actors=2, batch_size=a.batch_size, progress=False)
            for rep in range(a.repeats):
                for name, run in runs.items():
                    out = tmp / f"{rep}_{time.perf_counter_ns()}.csv"
                    s = run(out)
                    assert s.scored + s.errors == len(paths) and s.errors == 0, s
                    best[name] = max(best[name], len(paths) / s.seconds)
                    rate = getattr(s, "per_actor_images_per_second", float("nan"))
                    steady[name] = rate if not steady[name] >= rate else steady[name]
                    extra = (f"; {rate:.1f} rows/s per busy actor, first rows after {s.startup_seconds:.1f} s"
                             if hasattr(s, "startup_seconds") else "")
                    print(f"  repeat {rep}: {name}: {len(paths) / s.seconds:.1f} rows/s ({s.seconds:.1f} s){extra}", flush=True)
    base = best["lineside score (1 process)"]
    print(f"\n{Path(model).name}, {len(paths)} ELPV cells, batch {a.batch_size}, best of {a.repeats}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'run':<30} {'job rows/s':>10} {'vs 1 process':>13} {'per actor rows/s':>17}")
    for name, rate in best.items():
        print(f"{name:<30} {rate:>10.1f} {rate / base:>12.2f}x {steady[name]:>17.1f}")
    print("job: rows / the whole job (with the actors' start); per actor: rows / the actors' summed busy seconds")


if __name__ == "__main__":
    main()
