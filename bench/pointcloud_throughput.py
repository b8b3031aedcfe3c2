"""Point-cloud encoder throughput on CPU: PointEncoder (PointNet++ set abstraction) vs PlainPointNet.

    python bench/pointcloud_throughput.py [--points 2048 16384] [--batch 1 16] [--seconds 2] [--threads N] [--device cuda]

Both encoders run eager (``torch.inference_mode``) on the same synthetic part clouds (points on
the faces of a 10 cm box half a metre from the sensor, no padding) in one run, alternating
rounds so both see the same machine state. Each cell is timed for about ``--seconds`` (at least
``--min-reps`` calls, fewer at 16k points happen automatically because calls are slower) after
one warm-up call per shape; clouds/s = batch x calls / time. The ratio column is PointEncoder / PlainPointNet.
Default configurations: ``PointEncoder()`` (128 → 32 groups, k = 32 → 16, widths 64-64-128 /
128-128-256) and ``PlainPointNet()`` (widths 64-128-256), both with ``embed_dim`` 192.

``--device cuda`` (when a GPU is lent) times both encoders there (synchronised). A second table
times the host-side open3d preprocessing a station runs per cloud before the model
(:func:`lineside.pointcloud.preprocess.preprocess_cloud`: outliers, voxel, normals, normalise,
sample): on the same synthetic clouds with 0.5 mm depth noise at each ``--points`` size, and on
the 15 real workshop-tool scans (2,000 points) when ``../shared/data/workshop_tools`` is present.
Its last column puts the preprocessing time per cloud beside the PointEncoder's batch-1 time, so
a station sees whether IO or the model bounds it.

``--threads`` sets torch's intra-op threads: on a machine shared with other jobs, 1 thread gives
steadier numbers than all cores (parallel kernels wait for a busy core at every op).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

from pathlib import Path

import numpy as np
import torch

from lineside.pointcloud.point_encoder import PlainPointNet, PointEncoder

TOOLS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "workshop_tools" / "tools"


def box_clouds(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """(batch, n, 3) points on the faces of a 10 x 6 x 2 cm box at z = 0.5 m."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([0.10, 0.06, 0.02])
    p = torch.rand(batch, n, 3, generator=g)
    face = torch.randint(0, 3, (batch, n), generator=g)
    side = torch.randint(0, 2, (batch, n), generator=g).float()
    p.scatter_(2, face.unsqueeze(-1), side.unsqueeze(-1))
    return p * size + torch.tensor([0.0, 0.0, 0.5])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preprocessing_times(points: list[int], reps: int = 3) -> list[tuple[str, int, float]]:
    """(cloud, raw points, ms per cloud) of :func:`preprocess_cloud` on synthetic and real clouds."""
    from lineside.pointcloud.io import PointCloud, read_point_cloud
    from lineside.pointcloud.preprocess import preprocess_cloud

    clouds = []
    for n in points:
        raw = box_clouds(1, n)[0].double().numpy()
        raw = raw + np.random.default_rng(0).normal(0.0, 0.0005, raw.shape)
        clouds.append((f"synthetic box, {n} points", PointCloud(raw), n))
    if TOOLS.is_dir():
        clouds += [(f"workshop tool: {d.name}", read_point_cloud(d / "point-cloud.ply"), 2000) for d in sorted(TOOLS.iterdir())
                   if (d / "point-cloud.ply").is_file()]
    out, tools = [], []
    for name, cloud, n in clouds:
        preprocess_cloud(cloud, n, voxel_size=0.001)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            preprocess_cloud(cloud, n, voxel_size=0.001)
        ms = 1000 * (time.perf_counter() - t0) / reps
        (tools if name.startswith("workshop") else out).append((name, len(cloud), ms))
    if tools:
        ms = [t[2] for t in tools]
        out.append((f"{len(tools)} workshop-tool scans (median; max {max(ms):.1f} ms)", 2000, float(np.median(ms))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per encoder and cell")
    ap.add_argument("--min-reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per cell (time split between them)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-preprocess", action="store_true", help="skip the open3d preprocessing table")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    models = {"PointEncoder": PointEncoder().eval().to(device), "PlainPointNet": PlainPointNet().eval().to(device)}
    rows = []
    start_all = time.perf_counter()
    for n in a.points:
        for b in a.batch:
            pts = box_clouds(b, n).to(device)
            mask = torch.ones(b, n, dtype=torch.bool, device=device)
            spent = {k: 0.0 for k in models}
            calls = {k: 0 for k in models}
            with torch.inference_mode():
                for m in models.values():
                    m(pts, mask)  # warm-up
                _sync(device)
                for _ in range(a.rounds):
                    for name, m in models.items():
                        t0 = time.perf_counter()
                        reps = 0
                        while reps < a.min_reps or time.perf_counter() - t0 < a.seconds / a.rounds:
                            m(pts, mask)
                            _sync(device)
                            reps += 1
                        spent[name] += time.perf_counter() - t0
                        calls[name] += reps
            rate = {k: b * calls[k] / spent[k] for k in models}
            rows.append((n, b, rate["PointEncoder"], rate["PlainPointNet"], calls["PointEncoder"], calls["PlainPointNet"]))
            print(f"  {n} points, batch {b}: {rate['PointEncoder']:.1f} vs {rate['PlainPointNet']:.1f} clouds/s", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where} (host: {cpu_name()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{time.perf_counter() - start_all:.0f} s in all\n")
    print("| points | batch | PointEncoder clouds/s | PlainPointNet clouds/s | PointEncoder / PlainPointNet | calls (enc / plain) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, b, r_enc, r_plain, c_enc, c_plain in rows:
        print(f"| {n} | {b} | {r_enc:.1f} | {r_plain:.1f} | {r_enc / r_plain:.2f}x | {c_enc} / {c_plain} |")
    if a.no_preprocess:
        return
    model_ms = {n: 1000.0 / r_enc for n, b, r_enc, *_ in rows if b == 1}
    print("\nopen3d preprocessing per cloud (outliers, 1 mm voxel, normals, normalise, sample), host CPU:\n")
    print("| cloud | raw points | preprocessing ms | PointEncoder batch-1 ms (same points) | preprocessing / model |")
    print("|---|---:|---:|---:|---:|")
    for name, n_raw, ms in preprocessing_times(a.points):
        n = n_raw
        ref = model_ms.get(n) or model_ms.get(min(model_ms, key=lambda k: abs(k - n))) if model_ms else None
        cell = f"{ref:.1f}" if ref else "–"
        ratio = f"{ms / ref:.2f}x" if ref else "–"
        print(f"| {name} | {n_raw} | {ms:.1f} | {cell} | {ratio} |")


if __name__ == "__main__":
    main()
