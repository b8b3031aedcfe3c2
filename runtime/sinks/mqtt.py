"""MQTT sink (paho-mqtt 2.x): one JSON message per record, QoS 1, plus a retained status message.

    mqtt://[user:password@]host[:port]/line3/station1/results[?client_id=ID]
    mqtts://host[:8883]/topic          (TLS with the system's CA certificates)

Records go to the URL's topic at QoS 1; a record counts as delivered once the broker's PUBACK
arrived. ``<topic>/status`` holds a retained ``{"state": "online", …}`` while the station is
connected and ``{"state": "offline", …}`` after it closes or, through the last will, after the
broker lost it. paho reconnects by itself; messages in flight when the connection dropped are
sent again on reconnect (``dup``), before any newer one, so the broker sees them in order.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import parse_qs, unquote, urlsplit

from lineside.runtime.sinks.base import Sink, SinkUnavailable

try:
    import paho.mqtt.client as mqtt
except ImportError:  # parse_mqtt_url works without it; MqttSink says how to install it
    mqtt = None

__all__ = ["MqttSink", "parse_mqtt_url"]


def parse_mqtt_url(url: str) -> dict:
    """``mqtt://[user:pw@]host[:port]/topic[?client_id=…]`` → host, port, topic, tls, username, password, client_id."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url}: an MQTT sink URL starts with mqtt:// or mqtts://")
    topic = unquote(u.path.lstrip("/"))
    if not u.hostname or not topic:
        raise ValueError(f"{url}: give the broker and the topic, as in mqtt://broker/line3/results")
    if any(c in topic for c in "#+") or "#" in url:
        raise ValueError(f"{url}: the topic may not hold the wildcards + or #")
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    tls = u.scheme == "mqtts"
    return {
        "host": u.hostname,
        "port": u.port or (8883 if tls else 1883),
        "topic": topic,
        "tls": tls,
        "username": unquote(u.username) if u.username else None,
        "password": unquote(u.password) if u.password else None,
        "client_id": query.get("client_id"),
    }


class MqttSink(Sink):
    """Publishes each record as JSON to one topic at QoS 1.

    Args:
        url: see the module docstring.
        ack_timeout: seconds to wait for the PUBACKs of one batch.
        connect_timeout: seconds :meth:`send_batch` waits for a connection before giving up.
        inflight: QoS 1 messages on the wire at once.
    """

    kind = "mqtt"

    def __init__(self, url: str, ack_timeout: float = 5.0, connect_timeout: float = 2.0, inflight: int = 32, keepalive: int = 30) -> None:
        if mqtt is None:
            raise ImportError("the MQTT sink needs paho-mqtt: pip install 'lineside[line]'")
        cfg = parse_mqtt_url(url)
        self.host, self.port, self.topic = cfg["host"], cfg["port"], cfg["topic"]
        self.status_topic = f"{self.topic}/status"
        self.name = f"{'mqtts' if cfg['tls'] else 'mqtt'}://{self.host}:{self.port}/{self.topic}"
        self.client_id = cfg["client_id"] or f"lineside-{socket.gethostname()}-{os.getpid()}"
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self._connected = threading.Event()
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, mqtt.MQTTMessageInfo] = OrderedDict()  # seq → published, not yet acknowledged
        self._acked: set[int] = set()  # message ids of records whose PUBACK arrived
        self._status_mids: set[int] = set()
        self.last_error = "not connected yet"

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True, protocol=mqtt.MQTTv311)
        if cfg["username"]:
            c.username_pw_set(cfg["username"], cfg["password"])
        if cfg["tls"]:
            c.tls_set()
        c.max_inflight_messages_set(max(1, inflight))
        c.reconnect_delay_set(0.1, 5)
        c.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.connect_async(self.host, self.port, keepalive)
        c.loop_start()  # connects, and reconnects after a loss, in paho's network thread
        self.client = c

    def _status(self, state: str) -> bytes:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        return json.dumps({"state": state, "client_id": self.client_id, "time": now}).encode()

    # -- paho's callbacks (its network thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            return
        info = client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        with self._cond:
            self._status_mids.add(info.mid)  # its PUBACK comes later, in this same thread
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self.last_error = f"connection to {self.host}:{self.port} lost ({reason_code})"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:  # paho holds its message lock here: never call paho while holding this one
            if mid in self._status_mids:
                self._status_mids.discard(mid)
            else:
                self._acked.add(mid)
                self._cond.notify_all()

    # -- sending ---------------------------------------------------------------------------------
    def send(self, record: dict) -> None:
        self.send_batch([record])

    def send_batch(self, records: Sequence[dict]) -> int:
        if not self._connected.wait(self.connect_timeout):
            raise SinkUnavailable(f"no connection to the broker {self.host}:{self.port} ({self.last_error})")
        # records published before (the connection dropped before their PUBACK) lead the batch: paho
        # sends them again on reconnect, so wait for those instead of publishing them twice, and
        # publish nothing newer before they are acknowledged
        old = 0
        while old < len(records) and records[old]["seq"] in self._pending:
            old += 1
        done = self._wait(records[:old], 0)
        if done < old:
            raise self._unavailable(done)
        for rec in records[old:]:
            payload = json.dumps(rec, ensure_ascii=False, separators=(", ", ": "), allow_nan=False).encode()
            info = self.client.publish(self.topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued by paho, sent on reconnect
                break
            self._pending[rec["seq"]] = info
        done = self._wait(records, old)
        if done < len(records):
            raise self._unavailable(done)
        return done

    def _unavailable(self, delivered: int) -> SinkUnavailable:
        if self._connected.is_set():
            return SinkUnavailable(f"no PUBACK within {self.ack_timeout:g} s", delivered)
        return SinkUnavailable(self.last_error, delivered)

    def _wait(self, records: Sequence[dict], start: int) -> int:
        """Wait for the PUBACKs of ``records`` in order; returns how many from the start arrived."""
        end = time.monotonic() + self.ack_timeout
        done = start
        with self._cond:
            for rec in records[start:]:
                info = self._pending.get(rec["seq"])
                if info is None:  # not published (paho's queue was full)
                    break
                while info.mid not in self._acked:
                    left = end - time.monotonic()
                    if left <= 0 or not self._connected.is_set():  # a lost connection: paho sends it again on reconnect
                        return done
                    self._cond.wait(min(left, 0.1))
                self._acked.discard(info.mid)
                del self._pending[rec["seq"]]
                done += 1
        return done

    def close(self) -> None:
        """Publish the retained offline status, disconnect."""
        try:
            if self._connected.is_set():
                info = self.client.publish(self.status_topic, self._status("offline"), qos=1, retain=True)
                try:
                    info.wait_for_publish(1.0)
                except (RuntimeError, ValueError):
                    pass
            self.client.disconnect()
        finally:
            self.client.loop_stop()
