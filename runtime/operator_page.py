"""The station's operator page, Prometheus metrics and health over HTTP (``lineside station --http HOST:PORT``).

    lineside station --model model.onnx --source /camera/drop --out r.jsonl --http 127.0.0.1:8080 --labels labels.csv

=======================  ====================================================================================
``GET /``                the operator page: the last frames with their overlays (heatmap, boxes), decision,
                         confidence and latency; decisions and operator labels per grade; p50 / p99 latency.
                         One click on a grade confirms or corrects the frame's decision.
``GET /metrics``         Prometheus text format (:mod:`lineside.runtime.metrics`)
``GET /health``          JSON ``{"ok", "frames", "errors", "last_frame", "last_frame_age_s", "model", "uptime_s"}``
``GET /api/state``       what the page shows, as JSON
``GET /frame/<id>.png``  frame ``id`` with its overlay, as the station graded it
``POST /label``          JSON ``{"id": frame id, "label": class name}``: appends ``path,label`` to the labels file
=======================  ====================================================================================

Labels go to the file that A/B shadow switching reads (``--labels``; :class:`lineside.runtime.shadow.LabelBook`):
a CSV of ``path,label`` with a ``path,label`` header, the path absolute, the label a class name; a
folder given as ``--labels`` gets ``operator.csv`` in it. A frame without a file path (video,
camera) is shown but cannot be labelled (the labels file keys frames by path).

The server is ``http.server`` in daemon threads; the station's loop only hands each batch's records
and frames to :class:`OperatorState` (references kept for the last ``keep`` frames, nothing encoded),
so a slow or stalled browser never holds up a frame. Overlays are drawn when a browser asks for them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from lineside.runtime.detections import HEATMAP_NAMES, blend_heatmap, draw_boxes
from lineside.runtime.metrics import StationMetrics
from lineside.runtime.station import LatencyStats

__all__ = ["PAGE_HTML", "LabelFile", "OperatorServer", "OperatorState", "labels_target", "open_operator_page", "parse_http_address"]

_MIN_SIDE = 256  # frames smaller than this are enlarged (nearest neighbour) so boxes and captions stay readable


def parse_http_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:8080`` and ``8080`` mean 127.0.0.1) → (host, port); ValueError naming the flag."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "", spec
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0: any free port)")
    return host, int(port)


def labels_target(spec: str | os.PathLike) -> Path:
    """The CSV the page appends to for ``--labels spec``: the file itself, or ``operator.csv`` in a folder."""
    p = Path(spec)
    return p / "operator.csv" if p.is_dir() or str(spec).endswith(("/", os.sep)) else p


class LabelFile:
    """Appends operator labels as ``path,label`` rows (the format :class:`~lineside.runtime.shadow.LabelBook`
    reads), one flushed and fsync'ed row per label, a ``path,label`` header in a new file.

    Args:
        path: the CSV (created with its folder when missing).
        class_names: the labels allowed.
    """

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(["path", "label"])

    def append(self, frame_path: str, label: str) -> None:
        if label not in self.class_names:
            raise ValueError(f"label {label!r} is no class of {self.class_names}")
        with self._lock, open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([os.path.abspath(frame_path), label])
            fh.flush()
            os.fsync(fh.fileno())


class OperatorState:
    """What the page shows: the last ``keep`` frames (record, image, heatmap), decisions and labels
    per grade, latency percentiles; and the metrics. The station calls :meth:`outputs` and
    :meth:`observe` from its loop; the HTTP threads read.

    Args:
        class_names: the model's grades.
        metrics: the Prometheus collectors (counted in :meth:`observe`).
        labels: where operator labels go (None: the page shows no label buttons).
        keep: frames kept for the page.
        box_class_names: defect classes, for the box colours.
        log: where a failure of the page's bookkeeping is reported (once; it never stops the station).
    """

    def __init__(self, class_names: Sequence[str], metrics: StationMetrics | None = None, labels: LabelFile | None = None,
                 keep: int = 24, box_class_names: Sequence[str] = (), log: Any = None) -> None:
        self.class_names = list(class_names)
        self.box_class_names = list(box_class_names)
        self.metrics, self.label_file, self.keep, self.log = metrics, labels, max(1, int(keep)), log
        self._lock = threading.Lock()
        self._frames: OrderedDict[int, dict] = OrderedDict()
        self._heat: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._next = 0
        self.decisions = {n: 0 for n in self.class_names}
        self.labelled = {n: 0 for n in self.class_names}
        self.verdicts = {"confirmed": 0, "corrected": 0}
        self.frames = self.errors = 0
        self.stats = LatencyStats()
        self._failed = False

    def _report(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            print(f"station: operator page: {type(exc).__name__}: {exc} (the station goes on)", file=self.log or sys.stderr, flush=True)

    # -- from the station's loop ---------------------------------------------------------------
    def outputs(self, frames: Sequence[Any], outputs: dict[str, np.ndarray]) -> None:
        """The active model's outputs of a batch of frames: their heatmaps are kept for the overlays."""
        try:
            name = next((n for n in HEATMAP_NAMES if n in outputs), None)
            if name is None:
                return
            heat = np.asarray(outputs[name])
            with self._lock:
                for i, f in enumerate(frames):
                    self._heat[(f.source, f.index)] = heat[i]
                while len(self._heat) > 4 * self.keep:
                    self._heat.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - the page never stops the line
            self._report(exc)

    def observe(self, records: Sequence[dict], images: Sequence[np.ndarray | None]) -> None:
        """One batch of records as written, with the frames they came from (same order)."""
        try:
            if self.metrics is not None:
                self.metrics.observe(records)
            with self._lock:
                for record, image in zip(records, images):
                    self.frames += 1
                    decision = record.get("decision")
                    if record.get("error") is not None:
                        self.errors += 1
                    elif decision in self.decisions:
                        self.decisions[decision] += 1
                    if record.get("error") is None and record.get("latency_ms") is not None:
                        self.stats.add([float(record["latency_ms"])], 0, 0, 0)
                    heat = self._heat.pop((record.get("source"), record.get("frame")), None)
                    self._frames[self._next] = {"id": self._next, "record": record, "image": image, "heat": heat, "label": None}
                    self._next += 1
                while len(self._frames) > self.keep:
                    self._frames.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - the page never stops the line
            self._report(exc)

    # -- for the browser -----------------------------------------------------------------------
    def label(self, frame_id: int, label: str) -> dict:
        """Write the operator's ``label`` for frame ``frame_id``; ValueError / KeyError when it cannot be."""
        if self.label_file is None:
            raise ValueError("the station runs without a labels file (--labels)")
        if label not in self.class_names:
            raise ValueError(f"label {label!r} is no class of {self.class_names}")
        with self._lock:
            entry = self._frames.get(int(frame_id))
            if entry is None:
                raise KeyError(f"frame {frame_id} is no longer on the page")
            path = entry["record"].get("path")
            if not path:
                raise ValueError(f"frame {frame_id} has no file path (video or camera): the labels file keys frames by path")
            verdict = "confirmed" if label == entry["record"].get("decision") else "corrected"
        self.label_file.append(path, label)  # outside the lock: the station's loop never waits on the disk
        with self._lock:
            previous = entry["label"]
            if previous is not None:  # a second click replaces the first (the last row of a path wins in the file too)
                self.labelled[previous["label"]] -= 1
                self.verdicts[previous["verdict"]] -= 1
            entry["label"] = {"label": label, "verdict": verdict}
            self.labelled[label] += 1
            self.verdicts[verdict] += 1
        if self.metrics is not None:
            self.metrics.label(verdict)
        return {"id": int(frame_id), "path": os.path.abspath(path), "label": label, "verdict": verdict, "file": str(self.label_file.path)}

    def state(self) -> dict:
        """The page's data: frames newest first (without pixels), counts per grade, latency."""
        def ms(v: float) -> float | None:
            return None if v != v else round(v, 2)

        with self._lock:
            frames = []
            for entry in reversed(self._frames.values()):
                r = entry["record"]
                frames.append({
                    "id": entry["id"], "path": r.get("path"), "name": os.path.basename(r.get("path") or "") or f"{r.get('source')}#{r.get('frame')}",
                    "frame": r.get("frame"), "timestamp": r.get("timestamp"), "decision": r.get("decision"),
                    "confidence": r.get("confidence"), "boxes": r.get("boxes") or [], "error": r.get("error"),
                    "latency_ms": r.get("latency_ms"), "image": entry["image"] is not None, "heatmap": entry["heat"] is not None,
                    "label": entry["label"], "can_label": bool(r.get("path")) and self.label_file is not None and r.get("error") is None,
                })
            return {
                "classes": self.class_names, "frames_total": self.frames, "errors": self.errors,
                "decisions": dict(self.decisions), "labels": dict(self.labelled), "verdicts": dict(self.verdicts),
                "p50_ms": ms(self.stats.percentile(50)), "p99_ms": ms(self.stats.percentile(99)),
                "labels_file": str(self.label_file.path) if self.label_file is not None else None,
                "model": self.metrics.model if self.metrics is not None else None, "frames": frames,
            }

    def overlay_png(self, frame_id: int) -> bytes:
        """Frame ``frame_id`` as PNG with its heatmap blended in and its boxes drawn; KeyError when gone."""
        from PIL import Image

        with self._lock:
            entry = self._frames.get(int(frame_id))
            if entry is None or entry["image"] is None:
                raise KeyError(f"frame {frame_id} has no image on the page")
            image, heat, boxes = entry["image"], entry["heat"], list(entry["record"].get("boxes") or [])
        a = np.asarray(image)
        a = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
        picture = Image.fromarray(a).convert("RGB")
        factor = -(-_MIN_SIDE // max(1, min(picture.size)))
        if factor > 1:
            picture = picture.resize((picture.size[0] * factor, picture.size[1] * factor), Image.NEAREST)
            boxes = [dict(b, box=[v * factor for v in b["box"]]) for b in boxes]
        if heat is not None:
            picture = blend_heatmap(picture, np.asarray(heat, np.float32))
        if boxes:
            draw_boxes(picture, boxes, self.box_class_names)
        buf = io.BytesIO()
        picture.save(buf, "PNG")
        return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the station's stderr is for the station

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def do_GET(self) -> None:
        page: OperatorServer = self.server.page
        path = urlparse(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(200, PAGE_HTML.encode(), "text/html; charset=utf-8")
            elif path == "/metrics":
                if page.metrics is None:
                    self._send(404, b"no metrics\n", "text/plain")
                else:
                    body, ctype = page.metrics.exposition()
                    self._send(200, body, ctype)
            elif path == "/health":
                health = page.health()
                self._json(200 if health["ok"] else 503, health)
            elif path == "/api/state":
                self._json(200, page.state.state())
            elif path.startswith("/frame/") and path.endswith(".png"):
                stem = path[len("/frame/"):-len(".png")]
                if not stem.isdigit():
                    self._json(404, {"error": f"no frame {stem!r}"})
                    return
                self._send(200, page.state.overlay_png(int(stem)), "image/png")
            else:
                self._json(404, {"error": f"no page {path}"})
        except KeyError as exc:
            self._json(404, {"error": str(exc.args[0] if exc.args else exc)})
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_POST(self) -> None:
        page: OperatorServer = self.server.page
        if urlparse(self.path).path != "/label":
            self._json(404, {"error": f"no endpoint {self.path}"})
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(n, 1 << 16)) or b"{}")
            if not isinstance(body, dict) or "id" not in body or "label" not in body:
                raise ValueError('expected JSON {"id": frame id, "label": class name}')
            self._json(200, page.state.label(int(body["id"]), str(body["label"])))
        except KeyError as exc:
            self._json(404, {"error": str(exc.args[0] if exc.args else exc)})
        except (ValueError, TypeError, OSError) as exc:
            self._json(400, {"error": str(exc)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    page: OperatorServer


class OperatorServer:
    """``/``, ``/metrics``, ``/health``, ``/api/state``, ``/frame/<id>.png`` and ``POST /label`` on ``host:port``,
    served from daemon threads.

    Args:
        state: the page's :class:`OperatorState` (its ``metrics`` serve ``/metrics`` and ``/health``).
        host, port: where to listen (port 0: a free port; :attr:`url` says which).
        running: whether the station loop runs (``/health``'s ``ok``).
    """

    def __init__(self, state: OperatorState, host: str = "127.0.0.1", port: int = 8080,
                 running: Callable[[], bool] | None = None) -> None:
        self.state = state
        self.metrics = state.metrics
        self.running = running or (lambda: True)
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"--http {host}:{port}: cannot listen there: {exc.strerror or exc}") from exc
        self._server.page = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        running = bool(self.running())
        if self.metrics is not None:
            return self.metrics.health(running)
        return {"ok": running, "frames": self.state.frames, "errors": self.state.errors, "model": None}

    def start(self) -> OperatorServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="station-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=2.0)
        self._server.server_close()

    def __enter__(self) -> OperatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_operator_page(backend: Any, spec: str, labels: str | os.PathLike | None, keep: int = 24,
                       running: Callable[[], bool] | None = None, log: Any = None) -> OperatorServer:
    """The metrics, the page's state and the server (not started) for a station on ``backend``,
    listening at ``spec`` (``HOST:PORT``), labels appended to ``labels`` (None: no label buttons)."""
    from lineside.runtime.metrics import model_info

    host, port = parse_http_address(spec)
    classes = list(getattr(backend, "class_names", None) or [])
    metrics = StationMetrics(model_info(backend), classes)
    label_file = LabelFile(labels_target(labels), classes) if labels is not None and classes else None
    boxes = list((getattr(backend, "metadata", None) or {}).get("box_class_names") or [])
    state = OperatorState(classes, metrics, label_file, keep=keep, box_class_names=boxes, log=log)
    return OperatorServer(state, host, port, running)


PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lineside station</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #14161a; color: #e8e8e8; }
 header { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: baseline; padding: .8rem 1.2rem; background: #1f2329; }
 header h1 { font-size: 1.1rem; margin: 0; }
 .kpi { font-variant-numeric: tabular-nums; }
 .kpi b { font-size: 1.2rem; }
 table { border-collapse: collapse; margin: .8rem 1.2rem; }
 th, td { padding: .2rem .8rem; text-align: right; border-bottom: 1px solid #333; font-variant-numeric: tabular-nums; }
 th:first-child, td:first-child { text-align: left; }
 #frames { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: .8rem; padding: 0 1.2rem 1.2rem; }
 .frame { background: #1f2329; border-radius: 6px; padding: .5rem; border: 2px solid transparent; }
 .frame.labelled { border-color: #3a7; }
 .frame img { width: 100%; image-rendering: pixelated; background: #000; display: block; }
 .frame .name { font-size: .8rem; color: #aaa; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 .decision { font-weight: bold; font-size: 1.05rem; }
 .error { color: #f66; }
 .boxes { font-size: .8rem; color: #cde; }
 .buttons { display: flex; flex-wrap: wrap; gap: .3rem; margin-top: .4rem; }
 button { background: #2d333b; color: #eee; border: 1px solid #555; border-radius: 4px; padding: .25rem .6rem; cursor: pointer; }
 button.model { border-color: #8ab; }
 button.chosen { background: #3a7; border-color: #3a7; }
 #status { color: #aaa; font-size: .8rem; }
</style>
</head>
<body>
<header>
 <h1>lineside station</h1>
 <span class="kpi" id="model"></span>
 <span class="kpi">frames <b id="frames-total">0</b></span>
 <span class="kpi">errors <b id="errors">0</b></span>
 <span class="kpi">p50 <b id="p50">-</b> ms</span>
 <span class="kpi">p99 <b id="p99">-</b> ms</span>
 <span class="kpi">confirmed <b id="confirmed">0</b></span>
 <span class="kpi">corrected <b id="corrected">0</b></span>
 <span id="status"></span>
</header>
<table id="counts"><thead><tr><th>grade</th><th>decisions</th><th>operator labels</th></tr></thead><tbody></tbody></table>
<div id="frames"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v) => (v === null || v === undefined) ? "-" : v.toFixed(1);
let shown = "";

function countsRows(s) {
  const body = $("counts").tBodies[0];
  body.replaceChildren(...s.classes.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.grade = c;
    for (const [cls, v] of [["grade", c], ["decisions", s.decisions[c]], ["labels", s.labels[c]]]) {
      const td = document.createElement("td"); td.className = cls; td.textContent = v; tr.append(td);
    }
    return tr;
  }));
}

function card(f, s) {
  const div = document.createElement("div");
  div.className = "frame" + (f.label ? " labelled" : "");
  div.dataset.id = f.id;
  if (f.image) {
    const img = document.createElement("img");
    img.src = "/frame/" + f.id + ".png"; img.alt = f.name; img.loading = "lazy";
    div.append(img);
  }
  const name = document.createElement("div"); name.className = "name fname"; name.textContent = f.name; name.title = f.path || f.name;
  div.append(name);
  const d = document.createElement("div");
  if (f.error) { d.className = "error"; d.textContent = f.error; }
  else {
    d.className = "decision";
    d.textContent = (f.decision ?? "-") + (f.confidence !== null && f.confidence !== undefined ? " " + (100 * f.confidence).toFixed(0) + " %" : "");
  }
  div.append(d);
  const meta = document.createElement("div"); meta.className = "name";
  meta.textContent = (f.latency_ms !== null ? f.latency_ms.toFixed(1) + " ms" : "") + (f.heatmap ? " · heatmap" : "");
  div.append(meta);
  if (f.boxes.length) {
    const b = document.createElement("div"); b.className = "boxes";
    b.textContent = f.boxes.map((x) => x.label + " " + x.score.toFixed(2)).join(", ");
    div.append(b);
  }
  if (f.can_label) {
    const row = document.createElement("div"); row.className = "buttons";
    for (const c of s.classes) {
      const btn = document.createElement("button");
      btn.textContent = c === f.decision ? "✓ " + c : c;
      btn.title = c === f.decision ? "confirm the decision" : "correct the decision to " + c;
      btn.dataset.label = c;
      if (c === f.decision) btn.classList.add("model");
      if (f.label && f.label.label === c) btn.classList.add("chosen");
      btn.addEventListener("click", () => sendLabel(f.id, c));
      row.append(btn);
    }
    div.append(row);
  }
  return div;
}

async function sendLabel(id, label) {
  const r = await fetch("/label", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({id, label})});
  const j = await r.json();
  $("status").textContent = r.ok ? (j.verdict + ": " + label + " → " + j.file) : ("not written: " + j.error);
  await refresh(true);
}

async function refresh(force) {
  let s;
  try { s = await (await fetch("/api/state", {cache: "no-store"})).json(); }
  catch (e) { $("status").textContent = "station not reachable"; return; }
  $("frames-total").textContent = s.frames_total;
  $("errors").textContent = s.errors;
  $("p50").textContent = fmt(s.p50_ms);
  $("p99").textContent = fmt(s.p99_ms);
  $("confirmed").textContent = s.verdicts.confirmed;
  $("corrected").textContent = s.verdicts.corrected;
  if (s.model) $("model").textContent = s.model.name + " " + s.model.version;
  countsRows(s);
  const key = JSON.stringify(s.frames.map((f) => [f.id, f.label && f.label.label]));
  if (force || key !== shown) {
    shown = key;
    $("frames").replaceChildren(...s.frames.map((f) => card(f, s)));
  }
}

refresh(true);
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
