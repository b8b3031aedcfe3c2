"""Station sinks against real far ends: a mosquitto broker, an asyncua server and an http.server.

The broker runs as a subprocess on a free loopback port with persistence on, and the receiver
subscribes with a persistent session (QoS 1), so a broker restart loses nothing on the receiving
side either; every check reads what the far end really got.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest

from lineside.cli.station import main as station_main
from lineside.runtime.backend import Backend
from lineside.runtime.sinks import RecordFanout, Spool, SpooledSink, check_sink_args, open_sinks
from lineside.runtime.sources import Frame, Source
from lineside.runtime.station import JsonlWriter, Station

try:
    import paho.mqtt.client as mqtt
except ImportError:
    mqtt = None
MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None or mqtt is None,
    reason="MQTT tests need a broker and paho-mqtt: apt-get install mosquitto (.ci/run does), pip install 'lineside[line]'")
CLASSES = ["ok", "mild", "severe"]
CKPT = Path(__file__).resolve().parent / "data" / "pre_namespace_tiny.ckpt"


# -- the station side: a backend and a source with known results ------------------------------------


class GreyBackend(Backend):
    """Grade from the mean grey level: < 85 ok, < 170 mild, else severe."""

    name = "grey"

    def __init__(self) -> None:
        super().__init__("<grey>")
        self.metadata = {
            "class_names": CLASSES,
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", 1, 16, 16]}],
            "outputs": [
                {"name": "grade_probs", "dtype": "float32", "shape": ["N", 3], "kind": "float"},
                {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
            ],
        }

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        grade = np.minimum(image.reshape(len(image), -1).mean(1) // 85, 2).astype(np.int64)
        probs = np.full((len(image), 3), 0.1, np.float32)
        probs[np.arange(len(image)), grade] = 0.8
        return {"grade_probs": probs, "grade": grade}


class FrameList(Source):
    """Frames of grey levels (an int) or errors (a str), ``every`` seconds apart."""

    def __init__(self, items, every: float = 0.0) -> None:
        super().__init__("line3")
        self.items, self.every = list(items), every

    def frames(self, channels, stop):
        for i, item in enumerate(self.items):
            if stop.is_set():
                return
            f = Frame("line3", i)
            if isinstance(item, str):
                f.error = item
            else:
                f.image = np.full((16, 16, 1), item, np.uint8)
            yield f
            if self.every:
                stop.wait(self.every)


def expected_grade(level: int) -> int:
    return min(level // 85, 2)


def run_station(items, out: Path, sinks, every: float = 0.0, log=None):
    station = Station(GreyBackend(), FrameList(items, every), out, batch_max=4, latency_budget_ms=5, report_every=0,
                      warmup=False, log=log or io.StringIO(), sinks=sinks)
    return station.run()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- far ends -----------------------------------------------------------------------------------------


class Broker:
    """mosquitto on a loopback port, persistence on (sessions and queued messages survive a restart)."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nuser {getpass.getuser()}\nlog_dest file {folder}/mosquitto.log\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto did not start: {self.proc.stderr.read().decode()}")
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not open its port")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # it saves sessions and queued messages, then exits
        self.proc.wait(10)

    def url(self, topic: str) -> str:
        return f"mqtt://127.0.0.1:{self.port}/{topic}"


class Receiver:
    """A QoS 1 subscriber with a persistent session: what reached the far side of the broker."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "receiver") -> None:
        self.messages: list[tuple[str, dict, bool]] = []  # topic, payload, retained
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        c.reconnect_delay_set(0.02, 0.1)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe([(t, 1) for t in topics])
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(5), "the receiver could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [m for t, m, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Broker, topic: str) -> dict:
    """The retained message on ``topic``, as a fresh subscriber sees it."""
    got: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peek-{time.monotonic_ns()}")
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        wait_for(lambda: got, 5, f"the retained message on {topic}")
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0]


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    yield b
    if b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait()


class PlcServer:
    """An asyncua server with the nodes a PLC would read: ns;s=Line3.Decision (String), .Grade (Int16), .Counter (UInt32)."""

    def __init__(self) -> None:
        from asyncua import ua
        from asyncua.sync import Server, ThreadLoop

        self.loop = ThreadLoop()  # its own loop thread, kept across stop/start
        self.loop.daemon = True
        self.loop.start()
        self.server = Server(tloop=self.loop)
        self.url = f"opc.tcp://127.0.0.1:{free_port()}"
        self.server.set_endpoint(self.url)
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = self.server.register_namespace("urn:lineside:test-plc")
        line = self.server.nodes.objects.add_object(ua.NodeId("Line3", self.ns), "Line3")
        self.nodes = {}
        for name, value, vt in (("Decision", "", ua.VariantType.String), ("Grade", 0, ua.VariantType.Int16), ("Counter", 0, ua.VariantType.UInt32)):
            node = line.add_variable(ua.NodeId(f"Line3.{name}", self.ns), name, value, varianttype=vt)
            node.set_writable()
            self.nodes[name] = node
        self.server.start()

    @property
    def decision_node(self) -> str:
        return f"ns={self.ns};s=Line3.Decision"

    def values(self) -> dict:
        return {name: node.read_value() for name, node in self.nodes.items()}

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            self.loop.stop()


@pytest.fixture(scope="module")
def plc():
    pytest.importorskip("asyncua", reason="the OPC UA sink needs asyncua: pip install 'lineside[line]'")
    server = PlcServer()
    yield server
    server.close()


class Webhook:
    """http.server taking JSON POSTs; the first ``fail`` requests get 503."""

    def __init__(self, fail: int = 0) -> None:
        self.bodies: list[dict] = []
        self.keys: list[str] = []
        self.refused = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.refused < fail:
                    hook.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                hook.bodies.append(json.loads(body))
                hook.keys.append(self.headers["Idempotency-Key"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/inspections"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the spool ------------------------------------------------------------------------------------------


def test_spool_is_ordered_durable_and_never_reuses_a_seq(tmp_path):
    path = tmp_path / "s.sqlite"
    sp = Spool(path)
    assert sp.append([{"frame": i} for i in range(5)]) == 5 and sp.append([]) == 0
    head = sp.head(3)
    assert [seq for seq, _ in head] == [1, 2, 3] and [json.loads(t)["frame"] for _, t in head] == [0, 1, 2]
    sp.done(5)
    assert len(sp) == 0
    sp.append([{"frame": 5}])
    sp.close()
    sp = Spool(path)  # reopened, as by the next station run
    assert [(seq, json.loads(t)) for seq, t in sp.head(10)] == [(6, {"frame": 5})]
    with pytest.raises(ValueError):
        sp.append([{"x": float("nan")}])  # no NaN on the wire, and the batch is not half-written
    assert len(sp) == 1
    sp.close()


def test_sink_flags_are_checked_before_anything_connects():
    check_sink_args(["mqtt://b/line3/results"], "opc.tcp://plc:4840", ["ns=2;s=Line3.Decision"], ["http://mes/api"])
    for args, msg in [
        ((["mqtt://b"],), "give the broker and the topic"),
        ((["mqtt://b/line/#"],), "wildcards"),
        ((["amqp://b/t"],), "mqtt://"),
        ((["mqtt://b/t", "mqtt://b/t"],), "given twice"),
        (((), None, ["ns=2;s=X"]), "needs --opcua"),
        (((), "opc.tcp://plc:4840", []), "decision node"),
        (((), "http://plc", ["ns=2;s=X"]), "opc.tcp://"),
        (((), "opc.tcp://plc:4840", ["ns=2;s=A", "decision=ns=2;s=B"]), "decision given twice"),
        (((), None, (), ["ftp://x/y"]), "http://"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_sink_args(*args)


def test_cli_refuses_bad_sink_flags_before_loading_anything(tmp_path, capsys):
    base = ["--model", str(tmp_path / "missing.ckpt"), "--source", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), "--once"]
    for extra, msg in [(["--mqtt", "mqtt://broker"], "give the broker and the topic"),
                       (["--opcua-node", "ns=2;s=Line3.Decision"], "--opcua-node needs --opcua"),
                       (["--opcua", "opc.tcp://plc:4840"], "give the decision node"),
                       (["--webhook", "mes/api"], "http:// or https://")]:
        assert station_main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "missing.ckpt" not in err  # the flags fail first
    assert not (tmp_path / "r.spool").exists()


@needs_broker
def test_cli_sends_to_mqtt_and_a_webhook_with_the_spool_beside_the_results(tmp_path, broker, capsys):
    from PIL import Image

    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40), 60 * i, np.uint8)).save(drop / f"cell_{i}.png")
    topic = "line3/results"
    receiver = Receiver(broker, [topic])
    hook = Webhook()
    out = tmp_path / "results.jsonl"
    try:
        rc = station_main(["--model", str(CKPT), "--backend", "torch", "--source", str(drop), "--out", str(out), "--once",
                           "--no-warmup", "--settle-ms", "20", "--report-every", "0", "--mqtt", broker.url(topic), "--webhook", hook.url])
        assert rc == 0
        recs = read_jsonl(out)
        assert sorted(Path(r["path"]).name for r in recs) == ["cell_0.png", "cell_1.png", "cell_2.png"]
        wait_for(lambda: len(receiver.on(topic)) >= 3, 5, "3 MQTT messages")
        for got in (receiver.on(topic), hook.bodies):
            assert [m["seq"] for m in got] == [1, 2, 3]
            assert [{k: v for k, v in m.items() if k != "seq"} for m in got] == recs
        spools = sorted(p.name for p in (tmp_path / "results.spool").glob("*.sqlite"))
        assert [p.split("-")[0] for p in spools] == ["mqtt", "webhook"]
        err = capsys.readouterr().err
        assert f"→ {out}, mqtt://127.0.0.1:{broker.port}/{topic}, {hook.url}" in err
        assert err.count("3 records sent, none queued") == 2
    finally:
        receiver.close()
        hook.close()


# -- every sink at once -----------------------------------------------------------------------------------


@needs_broker
def test_station_with_every_sink_delivers_every_record_in_order(tmp_path, broker, plc):
    topic = "line3/station1/results"
    receiver = Receiver(broker, [topic, f"{topic}/status"])
    hook = Webhook(fail=2)  # the web service refuses twice first: those records are sent again
    levels = [10, 100, 200, "corrupt file", 40, 250, 90, 180, 30, 160] * 3
    out = tmp_path / "results.jsonl"
    log = io.StringIO()
    try:
        sinks = open_sinks([broker.url(topic)], plc.url, [plc.decision_node], [hook.url], tmp_path / "results.spool", log=log)
        assert sorted(s.sink.kind for s in sinks) == ["mqtt", "opcua", "webhook"]
        summary = run_station(levels, out, sinks, log=log)  # closing drains every sink
        assert summary.frames == 30 and summary.errors == 3
        assert summary.output == str(out)

        recs = read_jsonl(out)
        assert [r["frame"] for r in recs] == list(range(30))
        # MQTT: one message per record, seq 1…30 in order, the record itself after it
        wait_for(lambda: len(receiver.on(topic)) >= 30, 5, "30 MQTT messages")
        got = receiver.on(topic)
        assert [m["seq"] for m in got] == list(range(1, 31))
        assert [{k: v for k, v in m.items() if k != "seq"} for m in got] == recs
        for m, level in zip(got, levels):
            if isinstance(level, str):
                assert m["error"] == level and m["grade"] is None
            else:
                assert m["grade"] == expected_grade(level) and m["decision"] == CLASSES[m["grade"]]
        # the retained status: online while connected, offline after the station closed
        wait_for(lambda: receiver.on(f"{topic}/status")[-1]["state"] == "offline", 5, "the offline status")
        assert receiver.on(f"{topic}/status")[0]["state"] == "online"
        assert retained(broker, f"{topic}/status")["state"] == "offline"
        # OPC UA: the nodes hold the newest record (its Grade and Counter found as the Decision's siblings)
        last = got[-1]
        assert plc.values() == {"Decision": last["decision"], "Grade": last["grade"], "Counter": 30}
        # webhook: every record once, in order, keyed by seq, the two refused ones sent again
        assert hook.refused == 2
        assert [b["seq"] for b in hook.bodies] == list(range(1, 31)) and hook.keys == [str(i) for i in range(1, 31)]
        assert [{k: v for k, v in b.items() if k != "seq"} for b in hook.bodies] == recs
        # every spool is empty, and each sink said so
        assert all(len(Spool(p)) == 0 for p in (tmp_path / "results.spool").glob("*.sqlite"))
        assert log.getvalue().count("30 records sent, none queued") == 3
        assert "webhook" in log.getvalue() and "down: HTTP 503" in log.getvalue()
    finally:
        receiver.close()
        hook.close()


# -- the far end goes away --------------------------------------------------------------------------------


@needs_broker
def test_broker_stopped_mid_run_and_restarted_loses_nothing(tmp_path, broker):
    """300 frames at 100/s; the broker is stopped after ~60 arrived and restarted ~80 frames later."""
    from lineside.runtime.sinks.mqtt import MqttSink

    topic = "line3/results"
    receiver = Receiver(broker, [topic])
    log = io.StringIO()
    sink = SpooledSink(MqttSink(broker.url(topic), ack_timeout=1.0, connect_timeout=0.3), tmp_path / "spool" / "mqtt.sqlite", batch=16,
                       backoff=(0.05, 0.4), drain_timeout=15, log=log)
    out = tmp_path / "r.jsonl"
    n = 300
    events: dict = {}

    def written() -> int:  # complete lines in the results file (the station may be mid-append)
        return out.read_bytes().count(b"\n") if out.exists() else 0

    def outage() -> None:
        wait_for(lambda: len(receiver.on(topic)) >= 60, 20, "the first 60 records")
        broker.stop()
        events["stopped_at"] = written()
        wait_for(lambda: written() >= events["stopped_at"] + 80, 20, "80 more frames while the broker is down")
        events["queued_while_down"] = sink.queued
        broker.start()
        events["restarted_at"] = written()

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        summary = run_station([i % 256 for i in range(n)], out, [sink], every=0.01)
        t.join(20)
        assert not t.is_alive() and "restarted_at" in events, "the outage did not happen inside the run"
        # the station went on at its pace: every frame graded, none waited on the network
        assert summary.frames == n and summary.errors == 0
        assert summary.max_ms < 500, f"a frame waited {summary.max_ms:.0f} ms"
        assert events["stopped_at"] < events["restarted_at"] < n, events
        assert events["queued_while_down"] >= 70, events
        wait_for(lambda: len({m["seq"] for m in receiver.on(topic)}) >= n, 10, "every record at the receiver")
        got = receiver.on(topic)
        seqs = [m["seq"] for m in got]
        firsts = list(dict.fromkeys(seqs))  # de-duplicated on seq, first arrival kept
        assert firsts == list(range(1, n + 1)), "a record is missing or out of order"
        assert all(m["frame"] == m["seq"] - 1 for m in got)  # a repeat is the same record again
        dups = len(seqs) - len(firsts)
        assert dups <= 32, f"{dups} repeats"  # at most the batches in flight when the broker went
        text = log.getvalue()
        assert "down: " in text and "up again" in text and f"{n} records sent, none queued" in text
        print(f"broker restart: {n} frames, stopped after {events['stopped_at']}, restarted after {events['restarted_at']}, "
              f"{events['queued_while_down']} queued while down, {len(seqs)} messages received, {dups} repeats, "
              f"max latency {summary.max_ms:.1f} ms")
    finally:
        receiver.close()


@needs_broker
def test_records_wait_in_the_spool_for_the_next_run(tmp_path, broker):
    """The broker is down for a whole run: the station finishes at once, the next start sends everything."""
    from lineside.runtime.sinks.mqtt import MqttSink

    topic = "line3/results"
    receiver = Receiver(broker, [topic])
    broker.stop()
    spool = tmp_path / "results.spool" / "mqtt.sqlite"
    log = io.StringIO()
    t0 = time.monotonic()
    first = SpooledSink(MqttSink(broker.url(topic), connect_timeout=0.2), spool, drain_timeout=0.5, log=log)
    summary = run_station(list(range(0, 250, 10)), tmp_path / "r.jsonl", [first])
    assert summary.frames == 25 and time.monotonic() - t0 < 3  # a down sink does not hold up the exit
    assert len(Spool(spool)) == 25 and "25 queued in" in log.getvalue()
    assert receiver.on(topic) == []

    broker.start()
    try:
        wait_for(lambda: receiver.client.is_connected(), 5, "the receiver to reconnect")
        again = SpooledSink(MqttSink(broker.url(topic)), spool, log=log)  # the next run of the station
        wait_for(lambda: again.queued == 0, 10, "the spool to drain")
        again.close()
        wait_for(lambda: len(receiver.on(topic)) >= 25, 5, "25 records")
        got = receiver.on(topic)
        assert [m["seq"] for m in got] == list(range(1, 26))
        assert [m["grade"] for m in got] == [expected_grade(v) for v in range(0, 250, 10)]
    finally:
        receiver.close()


def test_opcua_server_down_then_back_holds_the_newest_record(tmp_path, plc):
    from lineside.runtime.sinks.opcua import OpcUaSink

    log = io.StringIO()
    nodes = {"decision": plc.decision_node, "grade": f"ns={plc.ns};s=Line3.Grade", "counter": f"ns={plc.ns};s=Line3.Counter"}
    plc.server.stop()
    try:
        sink = SpooledSink(OpcUaSink(plc.url, nodes, timeout=1.0), tmp_path / "opcua.sqlite", backoff=(0.05, 0.2), log=log)
        fanout = RecordFanout(JsonlWriter(tmp_path / "r.jsonl"), [sink])
        fanout.write([{"source": "line3", "frame": i, "decision": CLASSES[g], "grade": g, "error": None} for i, g in enumerate([0, 1, 2, 0, 2])])
        wait_for(lambda: sink.down is not None, 5, "the sink to notice the server is down")
        assert sink.queued == 5 and "down: " in log.getvalue()
    finally:
        plc.server.start()
    wait_for(lambda: sink.queued == 0, 10, "the spool to drain")
    assert plc.values() == {"Decision": "severe", "Grade": 2, "Counter": 5}
    fanout.write([{"source": "line3", "frame": 5, "decision": None, "grade": None, "error": "corrupt file"}])
    fanout.close()
    assert plc.values() == {"Decision": "error", "Grade": -1, "Counter": 6}
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 6
    assert "up again" in log.getvalue() and "6 records sent, none queued" in log.getvalue()


def test_opcua_nodes_the_server_lacks(plc):
    from lineside.runtime.sinks.base import SinkUnavailable
    from lineside.runtime.sinks.opcua import OpcUaSink, parse_node_args

    # an implied sibling the server lacks is left out; the others are written
    nodes, implied = parse_node_args([f"ns={plc.ns};s=Line3.Decision", f"counter=ns={plc.ns};s=Line3.Counter"])
    assert implied == {"grade": f"ns={plc.ns};s=Line3.Grade"}
    sink = OpcUaSink(plc.url, nodes, {"grade": f"ns={plc.ns};s=Line3.NoSuchGrade"})
    try:
        assert sink.send_batch([{"seq": 41, "decision": "mild", "grade": 1, "error": None}]) == 1
        assert sink.written == {"decision": "mild", "counter": 41}
        assert plc.values()["Decision"] == "mild" and plc.values()["Counter"] == 41
    finally:
        sink.close()
    # a node given by name that the server lacks: not delivered, and the reason names it
    sink = OpcUaSink(plc.url, {"decision": f"ns={plc.ns};s=Line3.Decision", "grade": f"ns={plc.ns};s=Line3.Typo"})
    try:
        with pytest.raises(SinkUnavailable, match=r"grade node ns=\d+;s=Line3.Typo"):
            sink.send({"seq": 42, "decision": "ok", "grade": 0, "error": None})
        assert plc.values()["Counter"] == 41
    finally:
        sink.close()
