"""OPC UA sink (asyncua): the latest decision, grade and a frame counter, written to nodes a PLC reads.

    --opcua opc.tcp://plc:4840 --opcua-node "ns=2;s=Line3.Decision"
    --opcua opc.tcp://plc:4840 --opcua-node "ns=2;s=Line3.Decision" --opcua-node "grade=ns=2;i=1002" --opcua-node "counter=ns=2;i=1003"

Nodes by field: ``decision`` (the grade name, ``"error"`` for a frame without a result), ``grade``
(the grade index, ``-1`` for an error frame; skipped for an unsigned node), ``counter`` (the
record's ``seq``: one more per frame, across restarts) and, when given, ``confidence``. A node id
without ``FIELD=`` is the decision; a decision node whose string id ends in ``Decision`` brings its
siblings ``…Grade`` and ``…Counter`` when the server has them. Values are written with each node's
own data type (read once per connection), all fields of a record in one Write service call.

The nodes hold a state, not a log: a batch of records (after an outage) writes its newest one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from lineside.runtime.sinks.base import Sink, SinkUnavailable

try:
    from asyncua import ua
    from asyncua.sync import Client, ThreadLoop
except ImportError:  # parse_node_args works without it; OpcUaSink says how to install it
    ua = Client = ThreadLoop = None

__all__ = ["FIELDS", "OpcUaSink", "parse_node_args"]

FIELDS = ("decision", "grade", "counter", "confidence")
_INTS = {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64"}
_FLOATS = {"Float", "Double"}


def parse_node_args(args: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--opcua-node`` values → (nodes given, siblings implied by the decision node), by field."""
    nodes: dict[str, str] = {}
    for arg in args:
        field, sep, node = arg.partition("=")
        if not sep or field not in FIELDS:  # a bare node id ("ns=2;s=…" has its own "=")
            field, node = "decision", arg
        if field in nodes:
            raise ValueError(f"--opcua-node: {field} given twice ({nodes[field]!r}, {node!r})")
        nodes[field] = node
    if "decision" not in nodes:
        raise ValueError("--opcua-node: give the decision node, e.g. --opcua-node 'ns=2;s=Line3.Decision'")
    implied: dict[str, str] = {}
    m = re.fullmatch(r"(.*\bs=.*)Decision", nodes["decision"])
    if m:
        for field, suffix in (("grade", "Grade"), ("counter", "Counter")):
            if field not in nodes:
                implied[field] = m.group(1) + suffix
    return nodes, implied


class OpcUaSink(Sink):
    """Writes each record's decision, grade and counter to OPC UA nodes.

    Args:
        url: ``opc.tcp://host:4840[/path]``.
        nodes: node id by field (see :data:`FIELDS`); ``decision`` at least.
        implied: node ids by field used only when the server has them (the decision's siblings).
        timeout: seconds for connecting and for each request.
    """

    kind = "opcua"

    def __init__(self, url: str, nodes: dict[str, str], implied: dict[str, str] | None = None, timeout: float = 2.0) -> None:
        if ua is None:
            raise ImportError("the OPC UA sink needs asyncua: pip install 'lineside[line]'")
        if not url.startswith("opc.tcp://"):
            raise ValueError(f"{url}: an OPC UA server URL starts with opc.tcp://")
        unknown = set(nodes) - set(FIELDS)
        if unknown or "decision" not in nodes:
            raise ValueError(f"OPC UA nodes: need 'decision', may have {', '.join(FIELDS)}; got {sorted(nodes)}")
        self.url = url
        self.name = re.sub(r"//[^@/]*@", "//", url)
        self.nodes = dict(nodes)
        self.implied = {k: v for k, v in (implied or {}).items() if k not in self.nodes}
        self.timeout = timeout
        self._client: Client | None = None
        self._targets: list[tuple[str, Any, Any]] = []  # (field, node, its type)
        self._loop = ThreadLoop(timeout=max(10.0, 4 * timeout))
        self._loop.daemon = True
        self._loop.start()
        self.written: dict[str, object] = {}  # the values last written, by field

    def _connect(self) -> None:
        client = Client(self.url, timeout=self.timeout, tloop=self._loop)
        try:
            client.connect()
            targets = []
            for field, node_id, required in [(f, n, True) for f, n in self.nodes.items()] + [(f, n, False) for f, n in self.implied.items()]:
                node = client.get_node(node_id)
                try:
                    vtype = node.read_data_type_as_variant_type()
                except ua.UaStatusCodeError as exc:
                    if required:
                        raise SinkUnavailable(f"{field} node {node_id}: {exc}") from exc
                    continue
                targets.append((field, node, vtype))
        except BaseException:
            self._drop(client)
            raise
        self._client, self._targets = client, targets

    def _drop(self, client: Client | None) -> None:
        if client is None:
            return
        with contextlib.suppress(Exception):  # the connection may be gone already
            client.disconnect()
        if client is self._client:
            self._client = None

    @staticmethod
    def _values(record: dict) -> dict[str, object]:
        error = record.get("error") is not None or record.get("decision") is None
        return {
            "decision": "error" if error else str(record["decision"]),
            "grade": -1 if error or record.get("grade") is None else int(record["grade"]),
            "counter": int(record["seq"]),
            "confidence": float(record.get("confidence") or 0.0),
        }

    def send(self, record: dict) -> None:
        values = self._values(record)
        try:
            if self._client is None:
                self._connect()
            nodes, data = [], []
            for field, node, vtype in self._targets:
                v = values[field]
                if vtype.name in _INTS:
                    if v < 0 and vtype.name.startswith(("U", "Byte")):
                        continue  # an error frame's -1 does not fit an unsigned grade node
                    v = int(v)
                elif vtype.name in _FLOATS:
                    v = float(v)
                elif vtype.name == "String":
                    v = str(v)
                nodes.append(node)
                data.append(ua.DataValue(ua.Variant(v, vtype)))
            self._client.write_values(nodes, data)
        except SinkUnavailable:
            raise
        except Exception as exc:
            self._drop(self._client)
            raise SinkUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        self.written = {field: values[field] for field, _, _ in self._targets}

    def send_batch(self, records: Sequence[dict]) -> int:
        """The nodes hold the newest record: write that one, and the batch counts as delivered."""
        if records:
            self.send(records[-1])
        return len(records)

    def close(self) -> None:
        self._drop(self._client)
        self._loop.stop()
