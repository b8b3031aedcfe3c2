"""Station metrics for Prometheus and the health answer (``lineside station --http HOST:PORT``).

:class:`StationMetrics` counts what the station writes, batch by batch, in its own
``prometheus_client`` registry (one per station, so tests and several stations in one process do
not collide), served as ``/metrics`` in the Prometheus text format by :mod:`lineside.runtime.operator_page`:

=========================================  =========  ===========================================================
metric                                     type       what
=========================================  =========  ===========================================================
``lineside_station_frames_total``          counter    frames with a record (graded or not)
``lineside_station_errors_total``          counter    frames without a result (corrupt file, failed inference, dropped)
``lineside_station_dropped_total``         counter    frames dropped behind a live source (also counted as errors)
``lineside_station_decisions_total``       counter    graded frames by ``grade`` (the class name of the decision)
``lineside_station_latency_seconds``       histogram  arrival → result per graded frame (``_bucket``, ``_sum``, ``_count``)
``lineside_station_last_frame_timestamp_seconds``  gauge  Unix time of the last record
``lineside_station_operator_labels_total``  counter   operator labels by ``verdict`` (``confirmed`` / ``corrected``)
``lineside_station_model_info``            info       ``name``, ``version``, ``format``, ``task``, ``classes``, ``created``
=========================================  =========  ===========================================================

``prometheus_client`` is an optional dependency (``pip install 'lineside[plant]'``), imported when a
:class:`StationMetrics` is made. Records from a promoted shadow count under the same names; the
``model`` of the info is the one the station started with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["LATENCY_BUCKETS", "StationMetrics", "model_info", "require_prometheus"]

# seconds: 1 ms … 10 s, dense where line-side budgets sit (10–100 ms)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


def require_prometheus():
    """The ``prometheus_client`` module, or ImportError naming the extra that brings it."""
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("station metrics need prometheus-client: pip install 'lineside[plant]'") from exc
    return prometheus_client


def model_info(backend: Any) -> dict[str, str]:
    """Name, version (the artefact's or checkpoint's sha256, first 12 hex digits), format, task,
    classes and export time of a backend's model, as strings."""
    meta = getattr(backend, "metadata", None) or {}
    path = str(getattr(backend, "path", "") or "")
    digest = meta.get("artefact_sha256") or meta.get("model_sha256") or ""
    return {
        "name": Path(path).name or str(getattr(backend, "name", "model")),
        "version": digest[:12] or str(meta.get("created") or "unknown"),
        "format": str(getattr(backend, "name", meta.get("format", ""))),
        "task": str(meta.get("task") or ""),
        "classes": "/".join(getattr(backend, "class_names", None) or meta.get("class_names") or []),
        "created": str(meta.get("created") or ""),
    }


class StationMetrics:
    """Prometheus collectors of one station and its health.

    Args:
        model: :func:`model_info` of the station's model (``name`` and ``version`` at least).
        class_names: the grades, so every ``decisions_total{grade=…}`` series exists from the start (0).

    :meth:`observe` takes each batch of records as the station writes it; :meth:`health` and
    :meth:`exposition` may be called from any thread.
    """

    def __init__(self, model: dict[str, str], class_names: Iterable[str] = ()) -> None:
        pc = require_prometheus()
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.model = dict(model)
        self._lock = threading.Lock()
        ns = "lineside_station"
        self.frames = pc.Counter("frames", "Frames with a record (graded or not)", namespace=ns, registry=self.registry)
        self.errors = pc.Counter("errors", "Frames without a result (corrupt file, failed inference, dropped)", namespace=ns,
                                 registry=self.registry)
        self.dropped = pc.Counter("dropped", "Frames dropped behind a live source", namespace=ns, registry=self.registry)
        self.decisions = pc.Counter("decisions", "Graded frames by decision", ["grade"], namespace=ns, registry=self.registry)
        self.latency = pc.Histogram("latency_seconds", "Arrival to result per graded frame", namespace=ns, buckets=LATENCY_BUCKETS,
                                    registry=self.registry)
        self.last_frame = pc.Gauge("last_frame_timestamp_seconds", "Unix time of the last record", namespace=ns, registry=self.registry)
        self.labels = pc.Counter("operator_labels", "Operator labels by verdict", ["verdict"], namespace=ns, registry=self.registry)
        info = pc.Info("model", "The model the station runs", namespace=ns, registry=self.registry)
        info.info({k: str(v) for k, v in self.model.items()})
        for name in class_names:
            self.decisions.labels(grade=name)
        for verdict in ("confirmed", "corrected"):
            self.labels.labels(verdict=verdict)
        self._frames = self._errors = 0
        self._last_time: float | None = None
        self._last_iso: str | None = None
        self.started = time.time()

    def observe(self, records: Iterable[dict]) -> None:
        """Count one batch of station records (``decision``, ``latency_ms``, ``error``, ``timestamp``)."""
        frames = errors = dropped = 0
        last = None
        for r in records:
            if "frame" not in r and "event" in r:  # status / promotion records carry no frame
                continue
            frames += 1
            last = r
            if r.get("error") is not None:
                errors += 1
                dropped += str(r["error"]).startswith("dropped")
                continue
            if r.get("decision") is not None:
                self.decisions.labels(grade=str(r["decision"])).inc()
            if r.get("latency_ms") is not None:
                self.latency.observe(float(r["latency_ms"]) / 1000.0)
        if not frames:
            return
        now = time.time()
        self.frames.inc(frames)
        self.errors.inc(errors)
        self.dropped.inc(dropped)
        self.last_frame.set(now)
        with self._lock:
            self._frames += frames
            self._errors += errors
            self._last_time = now
            self._last_iso = last.get("timestamp") if last is not None else None

    def label(self, verdict: str) -> None:
        """Count an operator label (``confirmed`` or ``corrected``)."""
        self.labels.labels(verdict=verdict).inc()

    def health(self, running: bool = True) -> dict:
        """``{"ok", "frames", "errors", "last_frame", "last_frame_age_s", "model", "uptime_s"}``: ok while the
        station loop runs (``running``)."""
        with self._lock:
            frames, errors, last, iso = self._frames, self._errors, self._last_time, self._last_iso
        now = time.time()
        return {
            "ok": bool(running),
            "frames": frames,
            "errors": errors,
            "last_frame": iso,
            "last_frame_age_s": None if last is None else round(now - last, 3),
            "model": self.model,
            "uptime_s": round(now - self.started, 3),
        }

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format and its content type."""
        pc = require_prometheus()
        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST
