"""Point-cloud encoder throughput on CPU: PointEncoder (PointNet++ set abstraction) vs PlainPointNet.

    python bench/pointcloud_throughput.py [--points 2048 16384] [--batch 1 16] [--seconds 2] [--threads N]

Both encoders run eager (``torch.inference_mode``) on the same synthetic part clouds (points on
the faces of a 10 cm box half a metre from the sensor, no padding) in one run, alternating
rounds so both see the same machine state. Each cell is timed for about ``--seconds`` (at least
``--min-reps`` calls, fewer at 16k points happen automatically because calls are slower) after
one warm-up call per shape; clouds/s = batch x calls / time. The ratio column is PointEncoder / PlainPointNet.
Default configurations: ``PointEncoder()`` (128 → 32 groups, k = 32 → 16, widths 64-64-128 /
128-128-256) and ``PlainPointNet()`` (widths 64-128-256), both with ``embed_dim`` 192.

``--threads`` sets torch's intra-op threads: on a machine shared with other jobs, 1 thread gives
steadier numbers than all cores (parallel kernels wait for a busy core at every op).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from lineside.pointcloud.point_encoder import PlainPointNet, PointEncoder


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per encoder and cell")
    ap.add_argument("--min-reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per cell (time split between them)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    models = {"PointEncoder": PointEncoder().eval(), "PlainPointNet": PlainPointNet().eval()}
    rows = []
    start_all = time.perf_counter()
    for n in a.points:
        for b in a.batch:
            pts = box_clouds(b, n)
            mask = torch.ones(b, n, dtype=torch.bool)
            spent = {k: 0.0 for k in models}
            calls = {k: 0 for k in models}
            with torch.inference_mode():
                for m in models.values():
                    m(pts, mask)  # warm-up
                for _ in range(a.rounds):
                    for name, m in models.items():
                        t0 = time.perf_counter()
                        reps = 0
                        while reps < a.min_reps or time.perf_counter() - t0 < a.seconds / a.rounds:
                            m(pts, mask)
                            reps += 1
                        spent[name] += time.perf_counter() - t0
                        calls[name] += reps
            rate = {k: b * calls[k] / spent[k] for k in models}
            rows.append((n, b, rate["PointEncoder"], rate["PlainPointNet"], calls["PointEncoder"], calls["PlainPointNet"]))
            print(f"  {n} points, batch {b}: {rate['PointEncoder']:.1f} vs {rate['PlainPointNet']:.1f} clouds/s", flush=True)

    print(f"\nCPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{time.perf_counter() - start_all:.0f} s in all\n")
    print("| points | batch | PointEncoder clouds/s | PlainPointNet clouds/s | PointEncoder / PlainPointNet | calls (enc / plain) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, b, r_enc, r_plain, c_enc, c_plain in rows:
        print(f"| {n} | {b} | {r_enc:.1f} | {r_plain:.1f} | {r_enc / r_plain:.2f}x | {c_enc} / {c_plain} |")


if __name__ == "__main__":
    main()
