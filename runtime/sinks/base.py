"""The sink interface: where station records go besides the results file (a broker, a PLC, a web service).

A :class:`Sink` delivers records and says how many were acknowledged by the far end; it never
queues on its own. :class:`~lineside.runtime.sinks.spool.SpooledSink` puts an on-disk spool and a
sender thread in front of it, so the station only appends to disk and nothing is lost while the
far end is down.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["Sink", "SinkUnavailable"]


class SinkUnavailable(Exception):
    """The far end is down, refused, or did not acknowledge in time; the records stay queued.

    ``delivered``: how many records from the start of the batch were acknowledged before it failed.
    """

    def __init__(self, reason: str, delivered: int = 0) -> None:
        super().__init__(reason)
        self.delivered = delivered


class Sink(ABC):
    """One destination for station records.

    Each record handed to a sink is the station's record (see :mod:`lineside.runtime.station`)
    with ``seq`` first: the spool's sequence number, increasing by one per record and never
    reused for that spool, the key a receiver de-duplicates on (delivery is at least once).
    """

    #: what the sink is, for logs and the spool's file name: ``kind`` (``mqtt``, ``opcua``,
    #: ``webhook``) and ``name`` (its URL, without credentials)
    kind: str = "sink"
    name: str = "sink"

    @abstractmethod
    def send(self, record: dict) -> None:
        """Deliver one record and return once the far end acknowledged it.

        Raises:
            SinkUnavailable: not delivered (or not acknowledged); it will be sent again.
        """

    def send_batch(self, records: Sequence[dict]) -> int:
        """Deliver records in order; returns how many were acknowledged (all of them).

        Raises:
            SinkUnavailable: with ``delivered``, the acknowledged prefix, when one was not.
        """
        for i, record in enumerate(records):
            try:
                self.send(record)
            except SinkUnavailable as exc:
                exc.delivered = i
                raise
        return len(records)

    def close(self) -> None:
        """Let go of the connection (records not acknowledged stay in the spool)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
