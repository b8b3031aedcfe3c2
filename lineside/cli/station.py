"""``lineside station``: the line-side loop (:class:`lineside.runtime.station.Station`) from the command line.

    lineside station --model export/model.onnx --source /camera/drop --out results.jsonl
    lineside station --model model.engine --device cuda --source genicam://21345678 --cti /opt/producer.cti --out r.jsonl
    lineside station --model best.ckpt --source run.avi --out r.jsonl --batch-size 8 --latency-budget-ms 50
    lineside station --model model.onnx --source /camera/drop --out r.jsonl --mqtt mqtt://broker/line3/results \
        --opcua opc.tcp://plc:4840 --opcua-node "ns=2;s=Line3.Decision" --webhook http://mes/api/inspections
    lineside station --model v3.onnx --shadow v4.onnx --source /camera/drop --out r.jsonl \
        --labels /line3/labels/ --promote-after 200 --margin 0.05
    lineside station --model model.onnx --source /camera/drop --out r.jsonl --http 127.0.0.1:8080 --labels labels.csv

``--http HOST:PORT`` serves the operator page (``/``), Prometheus metrics (``/metrics``) and health
(``/health``) beside the loop (:mod:`lineside.runtime.operator_page`); the page's labels go to ``--labels``.

SIGINT/SIGTERM: the batch in flight and the frames already arrived are finished and written, the
summary printed, exit 0 (a second signal writes the frames still queued as errors and leaves).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from lineside.cli.common import (
    MODEL_HELP,
    add_backend_arg,
    add_batch_size_arg,
    add_device_arg,
    add_model_arg,
    add_out_arg,
    add_adapter_arg,
    add_trust_checkpoint_arg,
)
from lineside.runtime.backend import BackendError
from lineside.runtime.open_model import open_model
from lineside.runtime.shadow import check_shadow_pair
from lineside.runtime.detections import BOX_SCORE_THRESHOLD
from lineside.runtime.module_score import grid_arg
from lineside.runtime.sinks import check_sink_args, default_spool_dir, open_sinks
from lineside.runtime.sources import FolderSource, SourceError, open_source
from lineside.runtime.station import Station, recorded_paths

DEFAULT_LABELS_SUFFIX = ".labels.csv"  # --http without --labels: results.jsonl → results.labels.csv

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lineside station",
        description="Line-side station: frames from a folder, glob, video, stream or GenICam camera through any "
        "exported model, one JSON line per frame.",
    )
    add_model_arg(ap, help=MODEL_HELP)
    ap.add_argument("--source", required=True, help="DIR (watched), GLOB (quote it), VIDEO file, rtsp://… / http://… stream, or genicam://[serial]")
    add_out_arg(ap, help="results .jsonl (appended; '-' for stdout)")
    add_batch_size_arg(ap, default=16, aliases=("--batch-max",), help="most frames per batch (default 16)")
    ap.add_argument("--latency-budget-ms", type=float, default=20.0, help="arrival → result budget that bounds batching (default 20)")
    add_device_arg(ap)
    add_backend_arg(ap)
    ap.add_argument("--existing", default="process", choices=["process", "skip"], help="files already in a watched folder (default process)")
    ap.add_argument("--once", action="store_true", help="folder: exit when drained instead of watching on")
    ap.add_argument("--report-every", type=float, default=5.0, help="seconds between progress lines on stderr (0: none)")
    ap.add_argument("--intrinsics", default=None, help="point models: pinhole intrinsics JSON for depth images "
                    "(default: <stem>.json or intrinsics.json beside each image)")
    ap.add_argument("--box-threshold", type=float, default=BOX_SCORE_THRESHOLD,
                    help=f"models with a localization head: boxes scoring at least this go into the records (default {BOX_SCORE_THRESHOLD})")
    ap.add_argument("--poll-ms", type=float, default=100.0, help="folder: milliseconds between looks (default 100)")
    ap.add_argument("--settle-ms", type=float, default=250.0, help="folder: a file must stay unchanged this long before it is read (default 250)")
    ap.add_argument("--no-watchdog", action="store_true", help="folder: poll even when watchdog is installed")
    ap.add_argument("--cti", default=None, help="genicam: GenTL producer .cti file or folder (default: $GENICAM_GENTL64_PATH)")
    ap.add_argument("--realtime", action="store_true", help="video file: deliver frames at the file's frame rate, as a camera would")
    ap.add_argument("--decoders", type=int, default=2, help="threads decoding image files (default 2)")
    ap.add_argument("--queue-size", type=int, default=None, help="decoded frames that may wait (default 4 x batch size)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up batches (the first batches then run without a time estimate)")
    ap.add_argument("--tile", default=None, choices=["cells"], help="cells: frames are whole-module EL images; one record per "
                    "module with a per-cell grid, its cells scored as one batch (see docs/modules.md)")
    ap.add_argument("--grid", default=None, type=grid_arg, metavar="ROWSxCOLS", help="with --tile cells: the module's cell grid, e.g. 6x10 "
                    "(either orientation; default: found in each frame)")
    add_trust_checkpoint_arg(ap)
    add_adapter_arg(ap)
    ab = ap.add_argument_group("A/B shadow", "a second model on every frame beside --model; only the active model's decision goes to the line")
    ab.add_argument("--shadow", default=None, metavar="MODEL", help="the shadow model (B), opened as --model is; it must take the same inputs and classes")
    ab.add_argument("--labels", default=None, metavar="FILE_OR_DIR",
                    help="operator labels: a CSV of path,label (class name or index) or a folder of them, re-read when they change; "
                    "with --http the operator page appends its labels here (a folder: operator.csv in it)")
    ab.add_argument("--promote-after", type=int, default=0, metavar="N",
                    help="switch: the shadow becomes active when it leads over the last N labelled frames (0: never; default 0)")
    ab.add_argument("--margin", type=float, default=0.0, metavar="M", help="the accuracy lead (0-1) the shadow needs to be promoted (default 0: any lead)")
    ab.add_argument("--status-every", type=int, default=500, metavar="N",
                    help="a station_status record (accuracy, agreement) every N frames (0: only at switches and the end; default 500)")
    op = ap.add_argument_group("operator page and metrics")
    op.add_argument("--http", default=None, metavar="HOST:PORT",
                    help="serve the operator page (/), Prometheus metrics (/metrics) and health (/health) here, e.g. 127.0.0.1:8080 "
                    f"(port 0: a free one, printed); labels go to --labels (default: beside --out, results{DEFAULT_LABELS_SUFFIX})")
    op.add_argument("--page-frames", type=int, default=24, metavar="N", help="frames the operator page shows (default 24)")
    sinks = ap.add_argument_group("sinks", "records to the line as well, each sink behind its own on-disk spool: sent in order, "
                                  "at least once (de-duplicate on the record's seq), queued on disk while the far end is down")
    sinks.add_argument("--mqtt", action="append", default=[], metavar="URL",
                       help="mqtt[s]://[user:pw@]host[:port]/topic: one JSON message per record, QoS 1, retained status on <topic>/status (repeatable)")
    sinks.add_argument("--opcua", default=None, metavar="URL", help="opc.tcp://host:4840: write the latest decision, grade and frame counter to nodes")
    sinks.add_argument("--opcua-node", action="append", default=[], metavar="[FIELD=]NODEID",
                       help="OPC UA node of a field (decision, grade, counter, confidence; a bare node id is the decision); "
                       "'ns=2;s=Line3.Decision' also brings ns=2;s=Line3.Grade and ns=2;s=Line3.Counter when the server has them")
    sinks.add_argument("--webhook", action="append", default=[], metavar="URL", help="http[s]:// URL: POST each record as JSON (repeatable)")
    sinks.add_argument("--spool", default=None, metavar="DIR", help="the sinks' spool folder (default: beside --out, results.jsonl → results.spool/)")
    sinks.add_argument("--sink-drain-s", type=float, default=5.0, metavar="S",
                       help="at exit, seconds to wait for the sinks to deliver what is queued (the rest waits in the spool for the next run; default 5)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if a.latency_budget_ms < 0 or a.report_every < 0 or a.decoders < 0:
        ap.error("--latency-budget-ms, --report-every and --decoders must not be negative")
    if (a.promote_after or (a.labels and not a.http)) and not a.shadow:
        ap.error("--labels and --promote-after compare two models: give --shadow too (or --http, whose page writes --labels)")
    if a.page_frames < 1:
        ap.error("--page-frames must be at least 1")
    if a.http and not a.labels and a.out != "-":
        a.labels = os.path.splitext(a.out)[0] + DEFAULT_LABELS_SUFFIX
    if a.promote_after < 0 or not 0 <= a.margin <= 1 or a.status_every < 0:
        ap.error("--promote-after and --status-every must not be negative, --margin is between 0 and 1")

    # signals first: a stop before the loop starts still ends cleanly
    holder: dict[str, Any] = {"station": None, "signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        st = holder["station"]
        if st is None:
            holder["signal"] = name
        elif st.stopping:
            st.abort()
        else:
            print(f"station: {name}: finishing the batch in flight (again to abort)", file=sys.stderr, flush=True)
            st.stop(name)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        source = None
        sinks: list = []
        page = None
        try:  # the source first: a wrong folder, URL or camera set-up fails before the model loads
            check_sink_args(a.mqtt, a.opcua, a.opcua_node, a.webhook)
            if a.http:
                from lineside.runtime.operator_page import open_operator_page, parse_http_address

                parse_http_address(a.http)
            done = recorded_paths(a.out) if a.out != "-" and a.existing == "process" else set()
            source = open_source(
                a.source,
                existing=a.existing,
                once=a.once,
                poll=a.poll_ms / 1000,
                settle=a.settle_ms / 1000,
                use_watchdog=False if a.no_watchdog else None,
                done=done,
                cti=a.cti,
                pace=a.realtime,
            )
            backend = open_model(a.model, a.backend, a.device, trust_checkpoint=a.trust_checkpoint, adapter=a.adapter)
            shadow = open_model(a.shadow, a.backend, a.device, trust_checkpoint=a.trust_checkpoint) if a.shadow else None
            if a.http:  # binds the port now (a taken one fails here) and creates the labels file
                station_of = holder.get
                page = open_operator_page(backend, a.http, a.labels, a.page_frames,
                                          running=lambda: station_of("station") is not None and not station_of("station").stopping)
            if shadow is not None:  # a mismatch fails here, before the sinks connect
                check_shadow_pair(backend, shadow)
                if a.labels and not os.path.exists(a.labels):
                    raise ValueError(f"--labels {a.labels}: no such file or folder")
            if a.intrinsics:  # a wrong file fails here, with the others
                from lineside.pointcloud.io import read_intrinsics

                a.intrinsics = read_intrinsics(a.intrinsics)
            if a.mqtt or a.opcua or a.opcua_node or a.webhook:  # last: they start connecting at once
                if a.opcua:
                    logging.getLogger("asyncua").setLevel(logging.ERROR)  # its per-connection notes, not errors
                sinks = open_sinks(a.mqtt, a.opcua, a.opcua_node, a.webhook, a.spool or default_spool_dir(a.out), a.sink_drain_s)
        except (BackendError, SourceError, OSError, ValueError, RuntimeError, ImportError) as exc:
            if source is not None:
                source.close()
            if page is not None:
                page.close()
            print(f"lineside station: error: {exc}", file=sys.stderr)
            return 2
        station = Station(
            backend,
            source,
            a.out,
            batch_max=a.batch_size,
            latency_budget_ms=a.latency_budget_ms,
            report_every=a.report_every,
            decoders=a.decoders,
            queue_size=a.queue_size,
            warmup=not a.no_warmup,
            box_threshold=a.box_threshold,
            intrinsics=a.intrinsics,
            sinks=sinks,
            shadow=shadow,
            labels=a.labels if shadow is not None else None,
            promote_after=a.promote_after,
            margin=a.margin,
            status_every=a.status_every,
            model_names=(a.model, a.shadow) if shadow is not None else None,
            observer=page.state if page is not None else None,
            tile=a.tile,
            grid=a.grid,
        )
        holder["station"] = station
        if holder["signal"]:
            station.stop(holder["signal"])
        if backend.takes_points:
            what = f"clouds of {backend.num_points} points → grasps"
        else:
            c, (h, w) = backend.channels, backend.input_size
            what = f"input {c}x{h}x{w}, classes {'/'.join(backend.class_names)}" if backend.class_names else f"input {c}x{h}x{w}"
            if "boxes" in station.decode.has:
                what += f", boxes of {'/'.join(station.decode.box_class_names)} ≥ {a.box_threshold:g}"
        resumed = f", {len(done)} files already recorded" if done and isinstance(source, FolderSource) else ""
        print(
            f"station: {backend.describe()} on {a.device}, {what}; "
            f"source {source.describe()}{resumed}; batch <= {station.batch_max}, latency budget {a.latency_budget_ms:g} ms → {a.out}"
            + "".join(f", {s.name}" for s in sinks)
            + (f"; shadow {shadow.describe()}" + (f", labels {a.labels}" if a.labels else "")
               + (f", promote after {a.promote_after} labels by {a.margin:g}" if a.promote_after else "") if shadow is not None else ""),
            file=sys.stderr,
            flush=True,
        )
        if not a.no_warmup:
            station.warmup()
            station.do_warmup = False
            t1, tn = station.timer.expected(1) * 1000, station.timer.expected(station.batch_max) * 1000
            print(f"station: warm-up: batch of 1 {t1:.1f} ms, of {station.batch_max} {tn:.1f} ms", file=sys.stderr, flush=True)
            if a.latency_budget_ms and t1 > a.latency_budget_ms:
                print(f"station: warning: one frame takes {t1:.1f} ms, over the {a.latency_budget_ms:g} ms budget", file=sys.stderr, flush=True)
        if page is not None:
            page.start()
            labels_to = page.state.label_file.path if page.state.label_file is not None else "nowhere (no --labels)"
            print(f"station: operator page {page.url}/ (metrics {page.url}/metrics, health {page.url}/health); labels → {labels_to}",
                  file=sys.stderr, flush=True)
        try:
            summary = station.run()
        finally:
            if page is not None:
                page.close()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 1 if summary.source_error else 0
