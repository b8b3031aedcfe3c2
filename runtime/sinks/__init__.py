"""Station sinks: records to the line (MQTT, OPC UA, a webhook), at least once, nothing lost.

Each sink (:class:`Sink`) sits behind its own on-disk spool (:class:`Spool`, SQLite) with a sender
thread (:class:`SpooledSink`): the station only appends to disk, the sender delivers in order,
retries with backoff while the far end is down, and deletes a record only once it was
acknowledged (MQTT QoS 1 PUBACK, OPC UA Write success, HTTP 2xx). Records carry ``seq`` to
de-duplicate on. :class:`RecordFanout` writes the results file and feeds every sink.

    sinks = open_sinks(mqtt=["mqtt://broker/line3/results"], webhook=["http://mes/api/inspections"], spool="results.spool")
    Station(backend, source, "results.jsonl", sinks=sinks).run()

MQTT needs ``paho-mqtt`` and OPC UA ``asyncua``: ``pip install 'lineside[line]'``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from lineside.runtime.sinks.base import Sink, SinkUnavailable
from lineside.runtime.sinks.fanout import RecordFanout
from lineside.runtime.sinks.spool import Spool
from lineside.runtime.sinks.spooled import SpooledSink
from lineside.runtime.sinks.webhook import WebhookSink

__all__ = ["RecordFanout", "Sink", "SinkUnavailable", "Spool", "SpooledSink", "WebhookSink", "check_sink_args",
           "default_spool_dir", "open_sinks", "spool_file"]


def default_spool_dir(out: str | os.PathLike) -> Path:
    """The spool folder beside a results file: ``results.jsonl`` → ``results.spool/`` (``-``: ``./lineside.spool``)."""
    if os.fspath(out) == "-":
        return Path("lineside.spool")
    p = Path(out)
    return p.with_name(p.stem + ".spool")


def spool_file(spool_dir: str | os.PathLike, sink: Sink, key: str) -> Path:
    """The spool of one sink: named by its kind and address, so the next run finds it again."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", sink.name.split("://", 1)[-1]).strip("_")[:60]
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(spool_dir) / f"{sink.kind}-{readable}-{digest}.sqlite"


def check_sink_args(mqtt: Sequence[str] = (), opcua: str | None = None, opcua_nodes: Sequence[str] = (),
                    webhook: Sequence[str] = ()) -> None:
    """Check the sink flags without connecting anywhere.

    Raises:
        ValueError: a malformed or repeated URL, a node list without a decision or without ``--opcua``.
    """
    from lineside.runtime.sinks.mqtt import parse_mqtt_url
    from lineside.runtime.sinks.opcua import parse_node_args

    for flag, urls in (("--mqtt", mqtt), ("--webhook", webhook)):
        twice = sorted({u for u in urls if list(urls).count(u) > 1})
        if twice:
            raise ValueError(f"{flag} {twice[0]} given twice")
    for url in mqtt:
        parse_mqtt_url(url)
    if opcua_nodes and not opcua:
        raise ValueError("--opcua-node needs --opcua opc.tcp://host:4840")
    if opcua:
        if not opcua.startswith("opc.tcp://"):
            raise ValueError(f"--opcua {opcua}: an OPC UA server URL starts with opc.tcp://")
        parse_node_args(opcua_nodes)
    for url in webhook:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--webhook {url}: give an http:// or https:// URL")


def open_sinks(
    mqtt: Sequence[str] = (),
    opcua: str | None = None,
    opcua_nodes: Sequence[str] = (),
    webhook: Sequence[str] = (),
    spool: str | os.PathLike = "lineside.spool",
    drain_timeout: float = 5.0,
    log: IO[str] | None = None,
) -> list[SpooledSink]:
    """Sinks from the station's flags, each behind its spool in ``spool``; they start connecting at once.

    Raises:
        ValueError: see :func:`check_sink_args`.
        ImportError: paho-mqtt or asyncua missing (the message says how to install them).
    """
    check_sink_args(mqtt, opcua, opcua_nodes, webhook)
    made: list[tuple[Sink, str]] = []
    try:
        for url in mqtt:
            from lineside.runtime.sinks.mqtt import MqttSink

            made.append((MqttSink(url), url))
        if opcua:
            from lineside.runtime.sinks.opcua import OpcUaSink, parse_node_args

            nodes, implied = parse_node_args(opcua_nodes)
            made.append((OpcUaSink(opcua, nodes, implied), f"{opcua} {sorted(nodes.items())}"))
        for url in webhook:
            made.append((WebhookSink(url), url))
    except BaseException:
        for sink, _ in made:
            sink.close()
        raise
    return [SpooledSink(sink, spool_file(spool, sink, key), drain_timeout=drain_timeout, log=log) for sink, key in made]
