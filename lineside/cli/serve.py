"""``lineside serve``: online inspection over HTTP on Ray Serve (:mod:`lineside.runtime.serve`).

    lineside serve --model export/el/model.onnx --replicas 2 --max-batch 32 --batch-wait-ms 5 --port 8000
    curl -s --data-binary @cell0001.png -H "Content-Type: image/png" http://127.0.0.1:8000/

Runs until Ctrl-C (or SIGTERM), then stops Serve (and the local Ray instance it started).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from lineside.cli.common import add_backend_arg, add_model_arg, add_trust_checkpoint_arg
from lineside.runtime.detections import BOX_SCORE_THRESHOLD

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineside serve", description="HTTP inspection endpoint on Ray Serve: one image per POST, "
                                 "the station's JSON record back; dynamic batching, replicas, any backend.")
    add_model_arg(ap, help="checkpoint or exported artefact (.onnx, .pt2, .engine, export folder)")
    ap.add_argument("--replicas", type=int, default=1, help="copies of the model serving requests (default 1)")
    ap.add_argument("--max-batch", type=int, default=32, help="the most images in one model call (default 32)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more images after its first (default 5)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    ap.add_argument("--address", default=None, help="Ray cluster to join: auto, ray://host:10001 (default: start a local Ray instance)")
    ap.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs per replica (the model then runs on cuda; default 0)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica, also its ONNX Runtime / torch threads (default 1)")
    ap.add_argument("--box-threshold", type=float, default=BOX_SCORE_THRESHOLD, help=f"boxes scoring at least this go into the records "
                    f"(default {BOX_SCORE_THRESHOLD})")
    add_backend_arg(ap)
    add_trust_checkpoint_arg(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lineside.vision.io import InputError

    try:
        from lineside.runtime.ray_score import ray_session
        from lineside.runtime.serve import build_app, serve_model

        # the model is checked (and a checkpoint exported once to ONNX on CPUs) before Ray starts
        app = build_app(a.model, replicas=a.replicas, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, backend=a.backend,
                        gpus_per_replica=a.gpus_per_replica, cpus_per_replica=a.cpus_per_replica, box_threshold=a.box_threshold,
                        trust_checkpoint=a.trust_checkpoint)
        with ray_session(a.address) as ray:
            from ray import serve

            try:
                url = serve_model(app, host=a.host, port=a.port)
                print(f"lineside serve: {a.model} on {a.replicas} replica{'s' if a.replicas > 1 else ''} at {url} "
                      f"(POST an image; GET for the model); Ctrl-C stops", flush=True)
                stop = threading.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: stop.set())
                while not stop.wait(1.0):
                    pass
            finally:
                serve.shutdown()
            del ray
    except (InputError, RuntimeError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"lineside serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
