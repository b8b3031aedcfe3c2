"""``lineside serve`` under load: throughput and p50/p99 latency on Ray Serve, beside ONNX Runtime in process.

    python bench/serve_load.py [--model MODEL.onnx|CKPT] [--requests 200] [--concurrency 4 16] [--replicas 1 2]

A small load client of its own (threads, one keep-alive HTTP connection each, loopback only, a bounded
number of requests) posts real ELPV cell PNGs (the first 64 of the dataset, in turn) to a Ray Serve
deployment of the model (:func:`lineside.runtime.serve.serve_model`, ``--max-batch 32
--batch-wait-ms 5``) on a local Ray instance with every core, at each ``--concurrency`` with each number
of ``--replicas`` (1 ONNX Runtime thread per replica). Latency is client-side (request sent → JSON
record read). Beside it, in this process: ONNX Runtime on the same files one at a time (decode, resize,
model, record: the work one request does without HTTP and batching) and in batches of 32, with one
intra-op thread (as each replica runs) and with ONNX Runtime's default (every core).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_throughput import _artefact  # noqa: E402

from lineside.runtime.backend import load_backend  # noqa: E402
from lineside.runtime.ray_score import ray_session  # noqa: E402
from lineside.runtime.records import RecordBuilder  # noqa: E402
from lineside.vision.elpv import elpv_records  # noqa: E402
from lineside.vision.io import read_image  # noqa: E402
from lineside.vision.preprocess import frames_to_batch  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[float, np.ndarray]:
    """``requests`` POSTs from ``concurrency`` threads: (requests/s, latencies in ms)."""
    target = urlparse(url)
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    failures: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                conn.request("POST", "/", body=bodies[i % len(bodies)], headers={"Content-Type": "image/png"})
                r = conn.getresponse()
                data = r.read()
                ms = (time.perf_counter() - t) * 1000.0
                if r.status != 200 or json.loads(data).get("error"):
                    failures.append(data[:200].decode(errors="replace"))
                with lock:
                    latencies.append(ms)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert not failures, failures[:3]
    return requests / seconds, np.asarray(latencies)


def _wait(url: str) -> None:
    import urllib.request

    for _ in range(240):
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an .onnx artefact or a checkpoint (default: the quickstart model)")
    ap.add_argument("--requests", type=int, default=200, help="requests per (replicas, concurrency) setting")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    a = ap.parse_args()

    paths = [r.path for r in elpv_records()[:64]]
    bodies = [Path(p).read_bytes() for p in paths]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        model = _artefact(a.model, Path(tmp_dir))

        # ONNX Runtime in this process, the same work per image without HTTP: with 1 intra-op thread (as a replica
        # runs) and with ONNX Runtime's default (every core)
        for threads, tag in ((1, "1 thread"), (0, "all cores")):
            runner = load_backend(model, threads=threads)
            records = RecordBuilder(runner)
            runner.warmup(1)
            lat = []
            t0 = time.perf_counter()
            for i in range(a.requests):
                t = time.perf_counter()
                image = read_image(paths[i % len(paths)], runner.channels)
                records(runner(frames_to_batch([image], runner.input_size)), 1, [image.shape[:2]])
                lat.append((time.perf_counter() - t) * 1000.0)
            rows.append((f"ORT in process, {tag}, b1", 1, a.requests / (time.perf_counter() - t0), np.asarray(lat)))
            t0 = time.perf_counter()
            for i in range(0, a.requests, 32):
                images = [read_image(paths[j % len(paths)], runner.channels) for j in range(i, min(i + 32, a.requests))]
                records(runner(frames_to_batch(images, runner.input_size)), len(images), [m.shape[:2] for m in images])
            rows.append((f"ORT in process, {tag}, b32", 1, a.requests / (time.perf_counter() - t0), None))
            runner.close()
            print(f"  {rows[-2][0]}: {rows[-2][2]:.1f} req/s; {rows[-1][0]}: {rows[-1][2]:.1f} img/s", flush=True)

        with ray_session(None, os.cpu_count()):
            from ray import serve

            for replicas in a.replicas:
                url = None
                try:
                    url = _serve(model, replicas, a)
                    load(url, bodies, min(32, a.requests), max(a.concurrency))  # warm-up: batches of every size seen
                    for conc in a.concurrency:
                        rate, lat = load(url, bodies, a.requests, conc)
                        rows.append((f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", conc, rate, lat))
                        print(f"  {rows[-1][0]}, concurrency {conc}: {rate:.1f} req/s, p50 {np.percentile(lat, 50):.1f} ms, "
                              f"p99 {np.percentile(lat, 99):.1f} ms", flush=True)
                finally:
                    serve.shutdown()
    print(f"\n{Path(model).name}, {a.requests} requests per row (ELPV cell PNGs), max batch {a.max_batch}, wait "
          f"{a.batch_wait_ms:g} ms; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    base = rows[0][2]
    print(f"{'setting':<30} {'conc':>4} {'req/s':>8} {'vs ORT 1 thread b1':>18} {'p50 ms':>8} {'p99 ms':>8}")
    for name, conc, rate, lat in rows:
        p50 = f"{np.percentile(lat, 50):8.1f}" if lat is not None else f"{'-':>8}"
        p99 = f"{np.percentile(lat, 99):8.1f}" if lat is not None else f"{'-':>8}"
        print(f"{name:<30} {conc:>4} {rate:>8.1f} {rate / base:>17.2f}x {p50} {p99}")


def _serve(model: str, replicas: int, a: argparse.Namespace) -> str:
    from lineside.runtime.serve import serve_model

    url = serve_model(model, host="127.0.0.1", port=_free_port(), replicas=replicas, max_batch=a.max_batch,
                      batch_wait_ms=a.batch_wait_ms)
    _wait(url)
    return url


if __name__ == "__main__":
    main()
