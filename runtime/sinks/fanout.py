"""The station's writer with sinks on: the results file first, then every sink's spool."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["RecordFanout"]


class RecordFanout:
    """Writes each batch of records to ``primary`` (the results file), then queues it on every sink.

    Args:
        primary: an object with ``write(records)`` and ``close()`` (a :class:`JsonlWriter`).
        sinks: :class:`~lineside.runtime.sinks.spooled.SpooledSink` s (anything with ``write`` and ``close(timeout)``).
        drain_timeout: :meth:`close` gives the sinks this long together (s) to deliver what is queued
            (default: the longest ``drain_timeout`` of the sinks).
    """

    def __init__(self, primary: Any, sinks: Sequence[Any], drain_timeout: float | None = None) -> None:
        self.primary = primary
        self.sinks = list(sinks)
        self.drain_timeout = max((getattr(s, "drain_timeout", 0.0) for s in self.sinks), default=0.0) if drain_timeout is None else drain_timeout
        self.path = getattr(primary, "path", type(primary).__name__)

    def write(self, records: Iterable[dict]) -> None:
        records = list(records)
        self.primary.write(records)
        for sink in self.sinks:
            sink.write(records)

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            end = time.monotonic() + self.drain_timeout  # the senders drain side by side: one deadline for all
            for sink in self.sinks:
                sink.close(timeout=max(0.0, end - time.monotonic()))
