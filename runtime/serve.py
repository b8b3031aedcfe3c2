"""Online inspection over HTTP on Ray Serve: ``lineside serve``, the station's record for one image per request.

    lineside serve --model export/el/model.onnx --replicas 2 --max-batch 32 --batch-wait-ms 5 --port 8000
    curl -s --data-binary @cell0001.png -H "Content-Type: image/png" http://127.0.0.1:8000/
    curl -s -F image=@cell0001.png http://127.0.0.1:8000/
    curl -s --data-binary @frame.raw "http://127.0.0.1:8000/?shape=300,300,1"     # raw uint8 pixels, row-major H, W, C

Each ``POST /`` carries one image, as

- a multipart upload (the first file part, e.g. ``-F image=@cell.png``);
- encoded bytes (``Content-Type: image/png``, ``image/jpeg`` … or ``application/octet-stream``), decoded by
  :func:`lineside.vision.io.read_image` as ``lineside score`` decodes files (16-bit and float images mapped
  to uint8, colour and grey converted to the model's channels);
- raw uint8 pixels with their shape in ``?shape=H,W[,C]`` or an ``X-Frame-Shape: H,W[,C]`` header, converted to
  the model's channels by :func:`lineside.runtime.sources.convert_frame` (what the station does with camera
  frames; 3-channel frames are RGB, or BGR with ``?order=BGR``).

The answer is the station's JSON record (:mod:`lineside.runtime.station`): ``source`` (``http``), ``frame``
(the replica's request counter), ``path`` (the upload's file name, else null), ``timestamp`` (arrival, ISO
8601 UTC), ``decision``, ``grade``, ``confidence``, ``probabilities`` — and ``boxes`` / ``grasps`` /
``outputs`` when the model gives them — from the one :class:`~lineside.runtime.records.RecordBuilder` every
command uses, then ``latency_ms`` (arrival → result, inside the replica) and ``error`` (null). An input that
cannot be used gets the same record with the result fields null and ``error`` saying why, status 422.
``GET /`` describes the model (name, backend, grade names, input size).

Requests are batched dynamically (``@serve.batch``): a replica gathers up to ``--max-batch`` images, waiting at
most ``--batch-wait-ms`` for more, and runs them as one backend call (in a thread, so the replica keeps
accepting requests meanwhile). Any backend runs: a checkpoint on CPUs is exported once to ONNX (the cached,
parity-checked export of ``lineside score``), an artefact runs on the backend its suffix names; with
``--gpus-per-replica`` it runs on the replica's GPU. ``--replicas`` copies of the model share the load, on this
machine or, with ``--address``, across a Ray cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lineside.runtime.detections import BOX_SCORE_THRESHOLD
from lineside.runtime.records import RecordBuilder
from lineside.runtime.sources import convert_frame, utc_now_iso
from lineside.vision.io import IMAGE_EXTENSIONS, InputError, read_image

__all__ = ["InspectionService", "build_app", "serve_model", "parse_shape"]

_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/bmp": ".bmp", "image/tiff": ".tif",
          "image/webp": ".webp", "image/x-portable-graymap": ".pgm", "image/x-portable-pixmap": ".ppm"}
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class BadRequest(ValueError):
    """The request holds no usable image; the message says why."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"H,W"`` or ``"H,W,C"`` → a shape tuple (C 1, 3 or 4)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise BadRequest(f"frame shape {text!r}: expected H,W or H,W,C (integers)") from None
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise BadRequest(f"frame shape {text!r}: expected H,W or H,W,C with C in 1, 3, 4")
    return shape


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, str | None, str]:
    """The first file part of a ``multipart/form-data`` body: (bytes, file name, content type)."""
    from email import policy
    from email.parser import BytesParser

    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest("multipart/form-data body without parts")
    parts = list(message.iter_parts())
    part = next((p for p in parts if p.get_filename()), parts[0] if parts else None)
    if part is None:
        raise BadRequest("multipart/form-data body without a file part")
    return part.get_payload(decode=True) or b"", part.get_filename(), part.get_content_type()


def decode_upload(body: bytes, name: str | None, content_type: str, channels: int) -> np.ndarray:
    """Encoded image bytes → uint8 (H, W, ``channels``), through :func:`read_image` (the decode of ``lineside score``)."""
    if not body:
        raise BadRequest(f"{name or 'upload'}: empty body (0 bytes)")
    suffix = Path(name).suffix.lower() if name else ""
    if suffix not in IMAGE_EXTENSIONS:
        suffix = _TYPES.get(content_type.split(";")[0].strip().lower(), ".png")
    with tempfile.NamedTemporaryFile(suffix=suffix, dir=_SCRATCH) as fh:
        fh.write(body)
        fh.flush()
        try:
            return read_image(fh.name, channels)
        except ValueError as exc:
            raise BadRequest(str(exc).replace(fh.name, name or "upload")) from None


def decode_raw(body: bytes, shape: tuple[int, ...], channels: int, order: str = "RGB") -> np.ndarray:
    """Raw uint8 pixels (row-major H, W[, C]) → uint8 (H, W, ``channels``)."""
    if len(body) != int(np.prod(shape)):
        raise BadRequest(f"raw frame of {len(body)} bytes does not match shape {','.join(map(str, shape))} ({int(np.prod(shape))} bytes)")
    try:
        return convert_frame(np.frombuffer(body, np.uint8).reshape(shape), channels, order)
    except ValueError as exc:
        raise BadRequest(f"raw frame: {exc}") from None


class InspectionService:
    """The body of the Ray Serve deployment (:func:`build_app`): one model per replica, requests batched.

    Args:
        spec: what to open (:func:`lineside.runtime.ray_score.plan_model`, run by :class:`~lineside.runtime.ray_score.SCORERS`).
        max_batch: the most images in one backend call.
        batch_wait_ms: how long a batch waits for more images after its first.
        box_threshold: boxes scoring at least this go into the records.
    """

    def __init__(self, spec: dict[str, Any], max_batch: int = 32, batch_wait_ms: float = 5.0,
                 box_threshold: float = BOX_SCORE_THRESHOLD) -> None:
        from ray import serve

        from lineside.runtime.ray_score import SCORERS

        self.runner = SCORERS[spec["backend"]].open(spec)
        if self.runner.takes_points:
            raise InputError(f"{self.runner.describe()} takes point clouds; lineside serve takes images")
        self.records = RecordBuilder(self.runner, box_threshold)
        self.counter = itertools.count()
        self.runner.warmup(1)
        limit = min(int(max_batch), self.runner.max_batch or int(max_batch))
        self.infer = serve.batch(max_batch_size=max(1, limit), batch_wait_timeout_s=max(0.0, batch_wait_ms) / 1000.0)(self._infer)

    def _run(self, frames: list[np.ndarray]) -> list[dict | str]:
        from lineside.vision.preprocess import frames_to_batch

        try:
            out = self.runner(frames_to_batch(frames, self.runner.input_size))
            return list(self.records(out, len(frames), [f.shape[:2] for f in frames]))
        except Exception as exc:  # noqa: BLE001 - isolate the frame that broke it
            if len(frames) == 1:
                return [f"inference failed: {type(exc).__name__}: {str(exc)[:500]}"]
        return [r for f in frames for r in self._run([f])]

    async def _infer(self, frames: list[np.ndarray]) -> list[dict | str]:
        return await asyncio.to_thread(self._run, frames)

    def describe(self) -> dict[str, Any]:
        r = self.runner
        return {"model": Path(r.path).name, "backend": r.name, "class_names": r.class_names, "input_size": list(r.input_size),
                "channels": r.channels, "outputs": r.output_names, "fields": sorted(self.records.has)}

    def _frame(self, body: bytes, content_type: str, query: Any, headers: Any) -> tuple[np.ndarray, str | None]:
        shape = query.get("shape") or headers.get("x-frame-shape")
        if content_type.startswith("multipart/form-data"):
            body, name, content_type = _multipart_file(body, content_type)
        else:
            name = query.get("name") or headers.get("x-filename")
        if shape:
            return decode_raw(body, parse_shape(shape), self.runner.channels, (query.get("order") or "RGB").upper()), name
        return decode_upload(body, name, content_type, self.runner.channels), name

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.describe())
        arrival = time.perf_counter()
        record: dict[str, Any] = {"source": "http", "frame": next(self.counter), "path": None, "timestamp": utc_now_iso()}
        status = 200
        try:
            body = await request.body()
            image, record["path"] = self._frame(body, request.headers.get("content-type", ""), request.query_params, request.headers)
            result = await self.infer(image)
        except BadRequest as exc:
            result = str(exc)
        if isinstance(result, dict):
            record |= result | {"latency_ms": round((time.perf_counter() - arrival) * 1000.0, 3), "error": None}
        else:
            status = 422
            record |= {"decision": None, "grade": None, "confidence": None, "probabilities": None}
            record |= {key: None for key in ("boxes", "grasps") if key in self.records.has}
            record |= {"latency_ms": round((time.perf_counter() - arrival) * 1000.0, 3), "error": result}
        return JSONResponse(record, status_code=status)


def build_app(model: str | os.PathLike, *, replicas: int = 1, max_batch: int = 32, batch_wait_ms: float = 5.0, backend: str = "auto",
              gpus_per_replica: float = 0, cpus_per_replica: float = 1.0, box_threshold: float = BOX_SCORE_THRESHOLD,
              trust_checkpoint: bool = False, max_ongoing_requests: int | None = None) -> Any:
    """The Ray Serve application of ``model`` (call inside a Ray session): ``replicas`` × :class:`InspectionService`.

    ``cpus_per_replica`` is each replica's logical CPUs and its ONNX Runtime / torch threads (at least 1);
    ``gpus_per_replica`` > 0 runs the model on the replica's GPU."""
    from ray import serve

    from lineside.runtime.ray_score import plan_model

    if replicas < 1:
        raise InputError(f"--replicas must be at least 1, got {replicas}")
    _, spec = plan_model(model, backend, "cuda" if gpus_per_replica > 0 else "cpu", None, None, None, trust_checkpoint)
    spec["threads"] = max(1, int(cpus_per_replica))
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    deployment = serve.deployment(InspectionService, name="lineside", num_replicas=replicas, ray_actor_options=options,
                                  max_ongoing_requests=max_ongoing_requests or max(64, 4 * max_batch))
    return deployment.bind(spec, max_batch, batch_wait_ms, box_threshold)


def serve_model(model: str | os.PathLike | Any, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``model`` (a path: :func:`build_app` with ``kwargs``; or an
    application :func:`build_app` made) at ``/``; returns the URL. Call inside a Ray session
    (:class:`lineside.runtime.ray_score.ray_session`); ``serve.shutdown()`` stops it."""
    from ray import serve

    app = build_app(model, **kwargs) if isinstance(model, (str, os.PathLike)) else model
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name="lineside", route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"
