"""The line-side station loop: frames from a folder, video, stream or camera → any backend → JSONL.

    lineside station --model export/model.onnx --source /camera/drop --out results.jsonl
    lineside station --model model.engine --device cuda --source genicam://21345678 --cti /opt/producer.cti --out r.jsonl
    lineside station --model best.ckpt --source run.avi --out r.jsonl --batch-size 8 --latency-budget-ms 50
    lineside station --model export/ --source "/data/line3/*.png" --out r.jsonl

Sources (:mod:`export.sources`): a folder watch (watchdog when installed, else polling; a file is
read only once complete; files already there are processed unless ``--existing skip``, those with
a record in ``--out`` are not processed twice; ``--once`` exits when the folder is drained), a
glob, a video file or RTSP/HTTP stream (OpenCV), a GenICam camera (``genicam://[serial]``,
optional ``harvesters`` and a GenTL producer ``--cti``).

Micro-batching: frames are gathered until ``--batch-size`` are waiting, or until the oldest has
waited ``--latency-budget-ms`` minus the expected time of the batch (measured at start and kept as
a running average per batch size), then run as one batch through the backend. Decoding runs in
``--decoders`` threads beside inference.

Output: one JSON line per frame, appended to ``--out``, flushed and fsync'ed after every batch:
``source``, ``frame`` (index), ``path`` (files), ``timestamp`` (arrival, ISO 8601 UTC),
``decision`` (the grade name), ``grade``, ``confidence``, ``probabilities`` (per class name),
``latency_ms`` (arrival → result), ``error`` (null, or why the frame has no result: corrupt
file, undecodable video frame, frame dropped behind a live source). A model with a localization
head adds ``boxes``: ``[{"label": name, "score": s, "box": [x1, y1, x2, y2]}, …]`` in pixels of
the original frame, best first, scoring at least ``--box-threshold`` (as in ``lineside score``);
heatmaps stay out of the records (``lineside score --heatmaps`` writes them). A bad frame never stops the
loop. Every ``--report-every`` seconds p50/p99 latency and frames/s go to stderr, and a summary
at the end. SIGINT/SIGTERM: the batch in flight and the frames already arrived are finished and
written, the summary printed, exit 0 (a second signal writes the frames still queued as errors
and leaves).

Sinks (:mod:`lineside.runtime.sinks`, ``--mqtt`` / ``--opcua`` / ``--webhook``): each batch of records
also goes to every sink's on-disk spool, and a sender thread per sink delivers it in order, at
least once, with ``seq`` to de-duplicate on; the station never waits on the network.

A/B shadow (``shadow=``, ``--shadow``; :mod:`lineside.runtime.shadow`): a second model runs on the
same batches; records keep the active model's fields and add ``active``, ``model`` and ``shadow``
(the other model's decision); with operator labels (``labels=``) both models' accuracy and their
agreement are counted, and with ``promote_after`` the shadow takes over the line when it leads,
written as a ``{"event": "promote"}`` record; ``station_status`` records carry the counts.

Point models (an artefact that takes ``points``): a folder or glob of ``.ply``/``.pcd``/``.xyz``/``.npy``
clouds in metres (or depth images with ``<stem>.json`` / ``intrinsics.json`` intrinsics beside them),
each prepared as in training (:mod:`export.point_inputs`); the records carry ``grasps`` (best first,
``position`` [x, y, z] m, ``approach``, ``closing``, ``width`` m, ``score``) in the cloud's sensor frame.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from lineside.runtime.backend import Backend  # noqa: E402
from lineside.runtime.detections import BOX_SCORE_THRESHOLD  # noqa: E402
from lineside.runtime.records import RecordBuilder  # noqa: E402
from lineside.runtime.shadow import LabelBook, ShadowTracker, check_shadow_pair  # noqa: E402
from lineside.runtime.sinks.fanout import RecordFanout  # noqa: E402
from lineside.runtime.sources import Frame, Source  # noqa: E402
from lineside.vision.preprocess import frames_to_batch  # noqa: E402

__all__ = [
    "BatchTimer",
    "FrameQueue",
    "JsonlWriter",
    "LatencyStats",
    "ResultDecoder",
    "Station",
    "StationSummary",
    "recorded_paths",
]

DROPPED = "dropped: the station fell behind the live source (queue full)"


# -------------------------------------------------------------------------------------------
# plumbing


class FrameQueue:
    """Frames between the source / decode threads and the inference loop.

    At most ``maxsize`` decoded images wait; a file or video-file source then waits (back-pressure),
    a live source's new frame is dropped instead (kept as an error record, without its image).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, int(maxsize))
        self._items: deque[Frame] = deque()
        self._images = 0
        self._cond = threading.Condition()
        self.closed = False

    def put(self, frame: Frame, block: bool = True) -> bool:
        with self._cond:
            if frame.image is not None:
                while self._images >= self.maxsize and not self.closed:
                    if not block:
                        frame.image, frame.error, frame.dropped = None, DROPPED, True
                        break
                    self._cond.wait(0.1)
            if self.closed:
                return False
            if frame.image is not None:
                self._images += 1
            self._items.append(frame)
            self._cond.notify_all()
            return True

    def get(self, timeout: float = 0.0) -> Frame | None:
        with self._cond:
            if not self._items and timeout > 0 and not self.closed:
                self._cond.wait_for(lambda: self._items or self.closed, timeout)
            if not self._items:
                return None
            frame = self._items.popleft()
            if frame.image is not None:
                self._images -= 1
            self._cond.notify_all()
            return frame

    def __len__(self) -> int:
        return len(self._items)

    @property
    def finished(self) -> bool:
        return self.closed and not self._items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class BatchTimer:
    """Expected seconds to run a batch of ``n`` frames: running average per batch size, conservative in between."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds: dict[int, float] = {}

    def update(self, n: int, seconds: float) -> None:
        if n <= 0:
            return
        old = self.seconds.get(n)
        self.seconds[n] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def expected(self, n: int) -> float:
        if not self.seconds or n <= 0:
            return 0.0
        if n in self.seconds:
            return self.seconds[n]
        larger = [m for m in self.seconds if m > n]
        if larger:
            return self.seconds[min(larger)]  # a bigger batch took this long: an upper bound
        m = max(self.seconds)
        return self.seconds[m] * n / m  # linear beyond the largest seen


class LatencyStats:
    """Frames, errors, batches and latencies: a window for the periodic report, a log histogram for the run."""

    _EDGES = 1e-3 * 1.01 ** np.arange(2100)  # 1 µs … ~1.2e6 ms at 1 % resolution

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.frames = self.errors = self.dropped = self.batches = 0
        self.max_batch = 0
        self.max_ms = 0.0
        self._batched = 0
        self._hist = np.zeros(len(self._EDGES) + 1, dtype=np.int64)
        self._window: list[float] = []
        self._window_start = self.start
        self._window_frames = 0

    def add(self, latencies_ms: Sequence[float], errors: int, dropped: int, batch_size: int) -> None:
        lat = np.asarray(latencies_ms, dtype=np.float64)
        self.frames += len(lat)
        self._window_frames += len(lat)
        self.errors += errors
        self.dropped += dropped
        if batch_size:
            self.batches += 1
            self.max_batch = max(self.max_batch, batch_size)
        self._batched += batch_size
        if len(lat):
            self._window.extend(lat.tolist())
            np.add.at(self._hist, np.searchsorted(self._EDGES, lat), 1)
            self.max_ms = max(self.max_ms, float(lat.max()))

    def percentile(self, q: float) -> float:
        n = int(self._hist.sum())
        if n == 0:
            return float("nan")
        i = int(np.searchsorted(np.cumsum(self._hist), math.ceil(q / 100 * n)))
        return min(float(self._EDGES[i]), self.max_ms) if i < len(self._EDGES) else self.max_ms

    @property
    def mean_batch(self) -> float:
        return self._batched / self.batches if self.batches else 0.0

    def report(self) -> str:
        """The line for the last window (and reset it)."""
        now = time.perf_counter()
        span = max(now - self._window_start, 1e-9)
        w = np.asarray(self._window)
        lat = f"latency p50 {np.percentile(w, 50):.1f} ms p99 {np.percentile(w, 99):.1f} ms" if len(w) else "latency -"
        line = (
            f"station: {self._window_frames} frames in {span:.1f} s ({self._window_frames / span:.1f} frames/s), {lat}; "
            f"total {self.frames} frames, {self.errors} errors"
            + (f", {self.dropped} dropped" if self.dropped else "")
        )
        self._window, self._window_start, self._window_frames = [], now, 0
        return line


@dataclass
class StationSummary:
    """What a station run did."""

    frames: int
    graded: int
    errors: int
    dropped: int
    seconds: float
    frames_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    batches: int
    mean_batch: float
    max_batch: int
    output: str
    stopped_by: str | None = None
    source_error: str | None = None

    def line(self) -> str:
        def ms(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.1f}"

        return (
            f"station summary: {self.frames} frames ({self.graded} graded, {self.errors} errors"
            + (f", {self.dropped} dropped" if self.dropped else "")
            + f") in {self.seconds:.1f} s, {self.frames_per_second:.1f} frames/s; latency p50 {ms(self.p50_ms)} ms "
            f"p90 {ms(self.p90_ms)} ms p99 {ms(self.p99_ms)} ms max {ms(self.max_ms)} ms; {self.batches} batches "
            f"(mean {self.mean_batch:.1f}, max {self.max_batch}) → {self.output}"
            + (f"; stopped by {self.stopped_by}" if self.stopped_by else "")
            + (f"; source failed: {self.source_error}" if self.source_error else "")
        )


class JsonlWriter:
    """Appends JSON lines durably (flush + fsync per :meth:`write`); ``-`` writes to stdout.

    A torn last line (a crash mid-write in an earlier run) is cut off before appending.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync and self.path != "-"
        if self.path == "-":
            self._fh: IO[bytes] = sys.stdout.buffer
            self._own = False
            return
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(p, "ab+")
        self._own = True
        size = self._fh.seek(0, os.SEEK_END)
        if size:
            self._fh.seek(max(0, size - 65536))
            tail = self._fh.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut >= 0 or size <= 65536:
                    self._fh.truncate(size - len(tail) + cut + 1)
                else:  # a torn line longer than the tail read: end it, it stays unparsable
                    self._fh.write(b"\n")
                self._fh.seek(0, os.SEEK_END)

    def write(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(", ", ": "), allow_nan=False) + "\n" for r in records)
        if not data:
            return
        self._fh.write(data.encode("utf-8"))
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._own and not self._fh.closed:
            self._fh.close()


def recorded_paths(path: str | os.PathLike) -> set[str]:
    """Absolute paths of the frames that already have a record in a results file (for resuming)."""
    done: set[str] = set()
    if not os.path.isfile(path):
        return done
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                p = json.loads(line).get("path")
            except (ValueError, AttributeError):
                continue
            if p:
                done.add(os.path.abspath(p))
    return done


# records are built by the one builder every command uses (lineside.runtime.records)
ResultDecoder = RecordBuilder


# -------------------------------------------------------------------------------------------
# the station


class Station:
    """Frames from ``source`` through ``backend`` in micro-batches, one JSON record per frame to ``writer``.

    Args:
        backend: any :class:`export.backends.Backend` (torch, ONNX Runtime, AOTInductor, TensorRT).
        source: an :class:`export.sources.Source` (see :func:`export.sources.open_source`).
        writer: a results path (JSONL, appended) or an object with ``write(records)`` and ``close()``.
        batch_max: the most frames in one batch (clamped to the backend's largest batch).
        latency_budget_ms: how long the oldest waiting frame may wait for its result; frames are
            gathered for at most this minus the expected batch time (0: run what is waiting now).
        report_every: seconds between the progress lines on ``log`` (0: none).
        decoders: threads that decode image files beside inference (0: decode in the source thread).
        queue_size: decoded frames that may wait (default 4 × ``batch_max``).
        warmup: run the backend on blank batches first, to measure the batch time and compile.
        log: where the progress lines and the summary go (default stderr).
        box_threshold: models with a localization head: boxes scoring at least this go into the records.
        intrinsics: point models: pinhole intrinsics (JSON path or ``CameraIntrinsics``) for depth images
            (default: ``<stem>.json`` / ``intrinsics.json`` beside each image).
        sinks: spooled sinks (:func:`lineside.runtime.sinks.open_sinks`) that get every batch of records
            after ``writer``; the station only appends to their spools, and :meth:`run` closes them at the end.
        shadow: a second model (B) run on the same frames as ``backend`` (A, active first); records keep
            the active model's decision and add ``shadow`` and ``active`` (see :mod:`lineside.runtime.shadow`).
        labels: with ``shadow``: a CSV of ``path,label`` or a folder of them, re-read when it changes.
        promote_after, margin: with ``shadow``: the shadow becomes active when its accuracy over the last
            ``promote_after`` labelled frames leads by ``margin`` (a ``promote`` record marks the switch).
        status_every: with ``shadow``: a ``station_status`` record every this many frames (0: none).
        model_names: the names of A and B in the records (default: their ``describe()``).
        tile: ``"cells"``: frames are whole-module images; each becomes one record with a per-cell grid, its
            cells scored as one batch (:mod:`lineside.runtime.module_score`); ``grid``: ``"6x10"`` when known.
        observer: gets each batch's records with their frames (``observe(records, images)``) and the
            active model's outputs (``outputs(frames, outputs)``), e.g. the operator page and metrics
            (:mod:`lineside.runtime.operator_page`); it keeps references only and must not block.
    """

    def __init__(
        self,
        backend: Backend,
        source: Source,
        writer: Any,
        batch_max: int = 16,
        latency_budget_ms: float = 20.0,
        report_every: float = 5.0,
        decoders: int = 2,
        queue_size: int | None = None,
        warmup: bool = True,
        log: IO[str] | None = None,
        box_threshold: float = BOX_SCORE_THRESHOLD,
        intrinsics: Any = None,
        sinks: Sequence[Any] = (),
        shadow: Backend | None = None,
        labels: str | os.PathLike | None = None,
        promote_after: int = 0,
        margin: float = 0.0,
        status_every: int = 0,
        model_names: tuple[str, str] | None = None,
        observer: Any = None,
        tile: str | None = None,
        grid: str | None = None,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, got {batch_max}")
        self.backend = backend
        self.source = source
        self.writer = JsonlWriter(writer) if isinstance(writer, (str, os.PathLike)) else writer
        if sinks:
            self.writer = RecordFanout(self.writer, sinks)
        self.batch_max = min(batch_max, backend.max_batch or batch_max, (shadow.max_batch if shadow is not None else 0) or batch_max)
        self.budget = max(0.0, float(latency_budget_ms)) / 1000.0
        self.report_every = report_every
        self.decoders = max(0, int(decoders))
        self.queue = FrameQueue(queue_size or 4 * self.batch_max)
        self.do_warmup = warmup
        self.log = log
        self.timer = BatchTimer()
        self.stats = LatencyStats()
        self.decode = RecordBuilder(backend, box_threshold)
        self.shadow_tracker: ShadowTracker | None = None
        self.labels: LabelBook | None = None
        self.status_every = max(0, int(status_every))
        self.observer = observer
        self._status_mark = 0
        if shadow is not None:
            check_shadow_pair(backend, shadow)
            names = model_names or (backend.describe(), shadow.describe())
            self.roles = {"A": (backend, self.decode), "B": (shadow, RecordBuilder(shadow, box_threshold))}
            self.shadow_tracker = ShadowTracker({"A": names[0], "B": names[1]}, promote_after, margin)
            if labels is not None:
                self.labels = LabelBook(labels, backend.class_names, log)
        elif labels is not None or promote_after:
            raise ValueError("labels and promotion compare two models: give a shadow model too")
        self.points = backend.takes_points
        if self.points:  # clouds (or depth images) → prepared arrays, read by the source's decode threads
            from lineside.export.point_inputs import CLOUD_INPUT_EXTENSIONS, DEPTH_EXTENSIONS, PointPreprocessing

            if backend.takes_image:
                raise ValueError(f"{backend.describe()} takes frames and clouds together; the station feeds one or the other")
            prep = PointPreprocessing.from_metadata(backend.metadata)
            if intrinsics is not None:
                from lineside.pointcloud.io import read_intrinsics

                k = intrinsics if not isinstance(intrinsics, (str, os.PathLike)) else read_intrinsics(intrinsics)
                source.reader = lambda path: prep.load(path, k)
            else:
                source.reader = prep.load
            source.extensions = CLOUD_INPUT_EXTENSIONS + DEPTH_EXTENSIONS
        self._stop = threading.Event()
        self._abort = False
        self.stopped_by: str | None = None
        self.source_error: str | None = None
        self._stop_time: float | None = None
        self.tiler = None
        if tile:  # whole-module frames: one record per module (runtime/module_score.py)
            from lineside.runtime.module_score import TILE_CHOICES, ModuleTiler

            if tile not in TILE_CHOICES or self.points:
                raise ValueError(f"tile {tile!r}: {list(TILE_CHOICES)} cut module images for an image model")
            self.tiler = ModuleTiler(grid)

    # -- control -----------------------------------------------------------------------------
    def stop(self, reason: str = "stop") -> None:
        """Finish the batch in flight and the frames already arrived, then return from :meth:`run`."""
        if self.stopped_by is None:
            self.stopped_by = reason
        self._stop.set()

    def abort(self) -> None:
        """Stop at once: frames still waiting are written as error records."""
        self._abort = True
        self.stop("abort")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _say(self, text: str) -> None:
        print(text, file=self.log or sys.stderr, flush=True)

    # -- warm-up -----------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run blank batches of 1 and ``batch_max`` frames; their times seed the expected batch times."""
        sizes = sorted({1, self.batch_max})
        if self.points:
            blank = {k: v[0] for k, v in self.backend.blank_inputs(1).items()}
        else:
            h, w = self.backend.input_size
            blank = np.zeros((h, w, self.backend.channels), dtype=np.uint8)
        backends = [b for b, _ in self.roles.values()] if self.shadow_tracker else [self.backend]
        for n in sizes:
            frames = [blank] * n
            for b in backends:
                self._infer(frames, b)  # first call: allocation, compilation, autotuning
            times = []
            for _ in range(2):
                t = time.perf_counter()
                for b in backends:  # the shadow runs in the same batch: its time counts too
                    self._infer(frames, b)
                times.append(time.perf_counter() - t)
            self.timer.update(n, min(times))

    def _infer(self, images: list, backend: Backend | None = None) -> dict[str, np.ndarray]:
        backend = backend or self.backend
        if self.points:
            from lineside.export.point_inputs import stack_inputs

            return backend(stack_inputs(images))
        return backend(frames_to_batch(images, backend.input_size))

    # -- producing ---------------------------------------------------------------------------
    def _decode_put(self, frame: Frame, gate: threading.Semaphore) -> None:
        try:
            self.queue.put(frame.load(), block=True)
        finally:
            gate.release()

    def _produce(self) -> None:
        pool = ThreadPoolExecutor(self.decoders, thread_name_prefix="station-decode") if self.decoders else None
        gate = threading.Semaphore(self.queue.maxsize + self.decoders)
        try:
            for frame in self.source.frames(1 if self.points else self.backend.channels, self._stop):
                if frame.loader is not None and pool is not None:
                    while not gate.acquire(timeout=0.1):
                        if self.queue.closed:
                            return
                    pool.submit(self._decode_put, frame, gate)
                else:
                    self.queue.put(frame.load(), block=not self.source.live)
                if self.queue.closed:
                    return
        except Exception as exc:  # noqa: BLE001 - a source failure ends the run, reported in the summary
            self.source_error = f"{type(exc).__name__}: {exc}"
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            self.queue.close()

    # -- consuming ---------------------------------------------------------------------------
    def _gather(self) -> list[Frame]:
        first = self.queue.get(timeout=0.05)
        if first is None:
            return []
        batch = [first]
        while len(batch) < self.batch_max:
            frame = self.queue.get()
            if frame is not None:
                batch.append(frame)
                continue
            if self.stopping or self.queue.finished:
                break
            # wait for one more frame only while the oldest can still meet its budget
            wait = first.arrival + self.budget - self.timer.expected(len(batch) + 1) - time.perf_counter()
            if wait <= 0:
                break
            frame = self.queue.get(timeout=min(wait, 0.1))
            if frame is not None:
                batch.append(frame)
        return batch

    def _run_good(self, frames: list[Frame], role: str | None = None) -> tuple[list[dict | str], float | None]:
        """Results (a row dict, or an error message) for decoded frames; the batch time when run as one."""
        backend, decode = self.roles[role] if role else (self.backend, self.decode)
        t = time.perf_counter()
        try:
            if self.tiler is not None:  # the cells of every module in the batch run as one batch
                names = [f.path or f"{f.source}#{f.index}" for f in frames]
                return list(self.tiler.records(backend, decode, [f.image for f in frames], names)), time.perf_counter() - t
            outputs = self._infer([f.image for f in frames], backend)
            if role is None and self.observer is not None:
                self.observer.outputs(frames, outputs)
            sizes = [f.image.shape[:2] for f in frames] if "boxes" in decode.has else None
            rows: list[dict | str] = list(decode(outputs, len(frames), sizes))
            return rows, time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - isolate the frame that broke it
            if len(frames) == 1:
                return [f"inference failed: {type(exc).__name__}: {str(exc)[:500]}"], None
        rows = []
        for f in frames:
            rows.extend(self._run_good([f], role)[0])
        return rows, None

    def _process(self, batch: list[Frame]) -> None:
        batch = sorted(batch, key=lambda f: (f.source, f.index))  # decode threads may finish out of order
        good = [f for f in batch if f.image is not None and f.error is None]
        results: dict[int, dict | str] = {}
        shadow_results: dict[int, dict | str] = {}
        tracker = self.shadow_tracker
        if good:
            rows, seconds = self._run_good(good)
            if tracker is not None:  # the same frames through the shadow; its failure never touches the line
                shadow_rows, shadow_seconds = self._run_good(good, tracker.shadow)
                shadow_results = {id(f): r for f, r in zip(good, shadow_rows)}
                seconds = None if seconds is None or shadow_seconds is None else seconds + shadow_seconds
            if seconds is not None:
                self.timer.update(len(good), seconds)
            results = {id(f): r for f, r in zip(good, rows)}
        done = time.perf_counter()
        images = [f.image for f in batch] if self.observer is not None else None
        records, latencies, errors, dropped = [], [], 0, 0
        for f in batch:
            latency = (done - f.arrival) * 1000.0
            res = results.get(id(f))
            record = {"source": f.source, "frame": f.index, "path": f.path, "timestamp": f.timestamp}
            if isinstance(res, dict):
                record |= res | {"latency_ms": round(latency, 3), "error": None}
            else:
                record |= {"decision": None, "grade": None, "confidence": None, "probabilities": None}
                record |= {key: None for key in ("boxes", "grasps") if key in self.decode.has}
                record |= {"latency_ms": round(latency, 3), "error": res if isinstance(res, str) else (f.error or "frame has no image")}
                errors += 1
                dropped += f.dropped
            if tracker is not None:
                record |= self._shadow_fields(record, shadow_results.get(id(f)), f.path)
            records.append(record)
            latencies.append(latency)
            f.image = None
        self.writer.write(records)
        self.stats.add(latencies, errors, dropped, len(good))
        if self.observer is not None:
            self.observer.observe(records, images)
        if tracker is not None:
            self._after_batch(tracker)

    def _shadow_fields(self, record: dict, res: dict | str | None, path: str | None) -> dict:
        """``active`` and ``shadow`` for one record; both decisions go to the tracker."""
        tracker = self.shadow_tracker
        row = res if isinstance(res, dict) else {}
        shadow = {"model": tracker.models[tracker.shadow], "decision": row.get("decision"), "grade": row.get("grade"),
                  "confidence": row.get("confidence")}
        if isinstance(res, str):
            shadow["error"] = res
        if record.get("error") is None:
            tracker.observe(path, {tracker.active: record.get("decision"), tracker.shadow: row.get("decision")})
        return {"active": tracker.active, "model": tracker.models[tracker.active], "shadow": shadow}

    def _events(self, records: list[dict]) -> None:
        """Status and switch records go to the results file only, not to the sinks (they carry no decision)."""
        getattr(self.writer, "primary", self.writer).write(records)

    def _after_batch(self, tracker: ShadowTracker) -> None:
        """New labels, a switch when the shadow leads, a status record every ``status_every`` graded frames."""
        events = []
        if self.labels is not None:
            tracker.add_labels(self.labels.poll())
        promoted = tracker.maybe_promote()
        if promoted is not None:  # from the next batch on, the new active model's decisions go to the line
            self.backend, self.decode = self.roles[tracker.active]
            events += [promoted, tracker.status()]
            self._say(f"station: promoted {tracker.active} ({promoted['model']}): accuracy {promoted['accuracy'][tracker.active]:.3f} "
                      f"vs {promoted['accuracy'][tracker.shadow]:.3f} over the last {promoted['window']} labelled frames")
        elif self.status_every and tracker.frames // self.status_every > self._status_mark:
            events.append(tracker.status())
        if self.status_every:
            self._status_mark = tracker.frames // self.status_every
        if events:
            self._events(events)

    def _flush_queued_as_errors(self) -> None:
        left = []
        while (f := self.queue.get()) is not None:
            f.image, f.error = None, f.error or "not processed: the station was stopped"
            left.append(f)
        if left:
            self._process(left)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> StationSummary:
        """Run until the source ends or :meth:`stop`; returns the summary (also printed to ``log``)."""
        if self.do_warmup:
            self.warmup()
        self.stats = LatencyStats()
        producer = threading.Thread(target=self._produce, name="station-source", daemon=True)
        producer.start()
        last_report = last_idle_poll = time.perf_counter()
        try:
            while True:
                if self._abort:
                    self.queue.close()
                    self._flush_queued_as_errors()
                    break
                batch = self._gather()
                if batch:
                    self._process(batch)
                elif self.queue.finished:
                    break
                now = time.perf_counter()
                if not batch and self.shadow_tracker is not None and now - last_idle_poll >= 0.2:
                    last_idle_poll = now  # late labels while no frames come
                    self._after_batch(self.shadow_tracker)
                if self.stopping:
                    if self._stop_time is None:
                        self._stop_time = now
                    elif now - self._stop_time > 3.0 and not len(self.queue):
                        self.queue.close()  # a source stuck in a blocking read: leave without it
                        break
                if self.report_every and now - last_report >= self.report_every:
                    last_report = now
                    self._say(self.stats.report() + (self.shadow_tracker.line() if self.shadow_tracker else ""))
        finally:
            self._stop.set()
            self.queue.close()
            producer.join(timeout=2.0)
            if not producer.is_alive():  # else it is stuck in a blocking read: closing under it could crash the capture library
                self.source.close()
            if self.shadow_tracker is not None:  # the last labels, then where both models stand
                try:
                    self._after_batch(self.shadow_tracker)
                    self._events([self.shadow_tracker.status()])
                except Exception as exc:  # noqa: BLE001 - the summary and closing come first
                    self._say(f"station: final status not written: {type(exc).__name__}: {exc}")
            close = getattr(self.writer, "close", None)
            if close is not None:
                close()
        summary = self.summary()
        self._say(summary.line() + (self.shadow_tracker.line() if self.shadow_tracker else ""))
        return summary

    def summary(self) -> StationSummary:
        s = self.stats
        seconds = time.perf_counter() - s.start
        return StationSummary(
            frames=s.frames,
            graded=s.frames - s.errors,
            errors=s.errors,
            dropped=s.dropped,
            seconds=seconds,
            frames_per_second=s.frames / seconds if seconds > 0 else 0.0,
            p50_ms=s.percentile(50),
            p90_ms=s.percentile(90),
            p99_ms=s.percentile(99),
            max_ms=s.max_ms if s.frames else float("nan"),
            batches=s.batches,
            mean_batch=s.mean_batch,
            max_batch=s.max_batch,
            output=getattr(self.writer, "path", type(self.writer).__name__),
            stopped_by=self.stopped_by,
            source_error=self.source_error,
        )

